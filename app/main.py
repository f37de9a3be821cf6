"""`streamlit run app/main.py` from a checkout: the web app, ``faceage.webapp.main``.

    FACEAGE_SERVE_URL=http://127.0.0.1:8000 uv run streamlit run app/main.py
"""

import sys
from pathlib import Path

# Streamlit puts app/ on sys.path, not the checkout: a faceage that is not installed still imports.
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from faceage.webapp.main import main  # noqa: E402

main()  # every rerun of this script draws the page again
