"""Backends hide the model behind a small protocol (see base.py).

diffusiond never downloads weights: the Hugging Face libraries are put in offline mode
before any of them is imported, and every load passes `local_files_only=True` as well.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
