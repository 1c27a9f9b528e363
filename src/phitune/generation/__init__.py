"""Text generation on a run's model: prompts with the chat template, stop ids, streaming (generate.py), and
``phitune chat`` (chat.py).
"""
