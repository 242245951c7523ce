"""A tiny random Llama saved as a model folder with the default model's tokenizer.

For code that loads a model by name in another process (Ray workers) or through another
tool (lm-eval): ``load_model(folder)`` takes well under a second.
"""

from conftest import tiny_llama


def save_tiny_llama(folder, **overrides) -> str:
    from transformers import AutoTokenizer

    from quicksilver.models import offline_model_folder

    tok = AutoTokenizer.from_pretrained(offline_model_folder("smollm2-135m"))
    tiny_llama(vocab_size=len(tok), **{"max_position_embeddings": 256, **overrides}).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)
