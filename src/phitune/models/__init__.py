"""Hugging Face models and tokenizers as phitune loads them: device, dtype and attention choice, 4-bit (QLoRA)
loading (loading.py); the Phi-3-style tokenizer builder and the end-of-turn rule (tokenizer.py).
"""
