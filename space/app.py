"""Hugging Face Space entry point: the adaptserve server (OpenAI API + Gradio UI) on the Space's CPU.

Spaces run `python app.py` and route to port 7860 ($PORT overrides it); `/` redirects to the UI at `/ui/`.
Run `make space` first so the `adaptserve` package and requirements.txt sit beside this file.
"""

import logging
import os

from adaptserve.serve import ServeConfig, serve

logging.basicConfig(level=logging.INFO)
serve(ServeConfig(host="0.0.0.0", port=int(os.environ.get("PORT", "7860"))))
