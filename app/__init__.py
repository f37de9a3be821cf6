"""The Streamlit front end: a thin HTTP/WebSocket client of the Serve endpoint (no torch)."""
