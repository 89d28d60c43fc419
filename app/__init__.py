"""ExPLAIND Studio dashboard: ``streamlit run app/main.py``; figures in ``app.charts``."""
