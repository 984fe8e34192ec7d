import sys
from pathlib import Path

# tests import small shared helpers (e.g. hf_models) from this folder
sys.path.insert(0, str(Path(__file__).resolve().parent))
