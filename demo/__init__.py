"""The gradio demo of anygen: ``demo.app.build_demo(engine)`` builds it, ``anygen demo`` launches it."""
