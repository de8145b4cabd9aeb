"""Put on PYTHONPATH by ``graph_bench.py --http-server uvicorn``: the Frontend serves through
uvicorn (``bench/uvicorn_frontend.py``) instead of the built-in server, nothing else changes."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import servegrid.components.frontend as frontend
from uvicorn_frontend import UvicornOpenAIServer

frontend.OpenAIHttpServer = UvicornOpenAIServer
