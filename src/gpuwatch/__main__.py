"""``python -m gpuwatch``: the same as the ``gpuwatch`` command."""

from .cli import main_entry

if __name__ == "__main__":
    main_entry()
