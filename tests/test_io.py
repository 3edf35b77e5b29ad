"""Sources, writers and files as items."""

from __future__ import annotations

import json

import numpy as np

from papy import Pipeline, ProcessPool, ThreadPool, io


def test_lines_jsonl_csv_and_files_read_lazily(tmp_path):
    (tmp_path / "a.txt").write_text("x\ny\n\nz\n")
    (tmp_path / "b.txt").write_text("w\n")
    assert list(io.lines(tmp_path / "*.txt")) == ["x", "y", "", "z", "w"]
    assert list(io.lines(tmp_path / "a.txt", skip_empty=True)) == ["x", "y", "z"]
    (tmp_path / "d.jsonl").write_text('{"a": 1}\n\n[2, 3]\n')
    assert list(io.jsonl(tmp_path / "d.jsonl")) == [{"a": 1}, [2, 3]]
    (tmp_path / "t.csv").write_text("name,n\nann,1\nbob,2\n")
    assert list(io.csv_rows(tmp_path / "t.csv")) == [
        {"name": "ann", "n": "1"},
        {"name": "bob", "n": "2"},
    ]
    assert next(io.csv_rows(tmp_path / "t.csv", header=False)) == ["name", "n"]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("")
    assert [p.name for p in io.files(str(tmp_path / "**" / "*.txt"))] == [
        "a.txt",
        "b.txt",
        "c.txt",
    ]
    gen = io.lines(tmp_path / "a.txt")
    assert next(gen) == "x"  # a generator: nothing read ahead


def test_writers_keep_map_order(tmp_path):
    pipe = Pipeline("write", pool=ThreadPool(3))
    pipe.add(lambda x: {"x": x, "sq": x * x}, name="square")
    n = io.write_jsonl(pipe.map(range(50)), tmp_path / "out.jsonl")
    assert n == 50
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert rows == [{"x": x, "sq": x * x} for x in range(50)]
    io.write_csv(pipe.map(range(3)), tmp_path / "out.csv")
    assert (tmp_path / "out.csv").read_text().splitlines() == ["x,sq", "0,0", "1,1", "2,4"]


def make_array(i):
    return io.dump_item(np.full((256, 256), i, dtype=np.float64))


def reduce_array(path):
    return float(io.load_item(path, mmap=True).sum())


def test_files_as_items_between_processes(tmp_path):
    with ProcessPool(2) as pool:
        pipe = Pipeline("files", pool=pool)
        a = pipe.add(make_array)
        pipe.add(reduce_array, after=a, pool=ThreadPool(2))
        assert list(pipe.map(range(6))) == [float(i * 256 * 256) for i in range(6)]


def test_dump_and_load_any_object(tmp_path):
    obj = {"a": [1, 2, 3], "b": b"bytes"}
    assert io.load_item(io.dump_item(obj, directory=tmp_path)) == obj
    assert io.load_item(io.dump_item(b"raw", directory=tmp_path), remove=True) == b"raw"
