"""bfloat16 fidelity: decoding one token at a time with the engine's bfloat16 kernels (native step,
native matmuls, whatever this machine chose) stays as close to the float32 model as HF's own
bfloat16 forward does (mean KL within 1.5x of HF bf16's), teacher-forced on held-out text."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.real_model


def _kl(ref_logits, logits):
    p = torch.log_softmax(ref_logits.float(), -1)
    q = torch.log_softmax(logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("preset", ["off"])
def test_bf16_decode_is_as_close_to_float32_as_hf_bf16(default_model, preset):
    from quicksilver import Engine, load_corpus, load_model
    from quicksilver.decoding import decode_one_token, new_caches, prefill

    model32, tok = default_model
    text = load_corpus("wiki", "test").documents[3]
    ids = torch.tensor(tok(text).input_ids[:49])
    with torch.inference_mode():
        ref = model32(ids[None]).logits[0, :-1]  # float32: the prediction after each prefix
        bf = load_model("smollm2-135m", dtype="bfloat16")
        hf = bf.model(ids[None]).logits[0, :-1]
        engine = Engine(bf.model, preset)
        cache = new_caches(engine, [ids.numel()])[0]
        steps = [prefill(engine, ids[:1], cache)[0][0]]
        for t in range(1, ids.numel() - 1):  # one token at a time: the decode path's kernels
            steps.append(decode_one_token(engine, ids[t : t + 1], [cache])[0][0])
        ours = torch.stack(steps)
    kl_hf, kl_ours = _kl(ref, hf), _kl(ref, ours)
    print(f"mean KL to float32 over {ours.shape[0]} steps: engine bf16 {kl_ours:.5f}, HF bf16 {kl_hf:.5f}")
    assert kl_ours <= 1.5 * kl_hf, (kl_ours, kl_hf)
    agree = float((ours.argmax(-1) == ref.argmax(-1)).float().mean())
    assert agree >= float((hf.argmax(-1) == ref.argmax(-1)).float().mean()) - 0.05
