"""The Streamlit front end (``main.py``): a thin HTTP/WebSocket client of the Serve endpoint
(no torch)."""
