"""``python -m papy`` is the ``papy`` command."""

from papy.cli import main

if __name__ == "__main__":
    main(prog_name="papy")
