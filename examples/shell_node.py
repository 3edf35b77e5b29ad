"""External programs as nodes: each item becomes one argument, never shell text.

Counts the words of some texts with ``wc`` and compresses them with ``gzip``.

    python examples/shell_node.py
"""

from papy import Pipeline, ThreadPool, shell

io = ThreadPool(4)
pipeline = Pipeline("shell", pool=io)
words = pipeline.add(shell(["wc", "-w"], stdin="item"), name="wc")
count = pipeline.add(lambda out: int(out.split()[0]), after=words, name="count")
packed = pipeline.add(shell(["gzip", "-c"], stdin="item", stdout="bytes"), name="gzip")
size = pipeline.add(len, after=packed, name="size")
pipeline.add(lambda n, z: {"words": n, "gzip_bytes": z}, after=[count, size], name="row")

if __name__ == "__main__":
    texts = ["a few words", "; rm -rf ~ is just text here", "$(reboot) too"]
    with io:
        for row in pipeline.map(texts):
            print(row)
