"""The Gradio class-to-image demo (app/app.py); `python -m app` starts it."""
