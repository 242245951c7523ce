"""The decoding core: one way to decode, driven by every front end.

``generate`` (the library and the CLI) and the server's scheduler both drive a ``DecodeBatch``:
request checks (``requests``), per-sequence samplers (``sampling``), caches and the runner
contract with its prefill, one-token and verify passes (``runner``), one stop check (``stop``),
and speculative decoding's draft sources beside it (``speculative``).
"""

from .batch import DecodeBatch, Sequence
from .generate import GenerationResult, SpeculativeResult, generate
from .requests import check_prompts, check_request
from .runner import Runner, decode_one_token, new_caches, prefill, prefill_batch
from .sampling import Sampler, make_probs, make_sampler
from .stop import StopCheck

__all__ = ["DecodeBatch", "GenerationResult", "Runner", "Sampler", "Sequence", "SpeculativeResult", "StopCheck",
           "check_prompts", "check_request", "decode_one_token", "generate", "make_probs", "make_sampler", "new_caches",
           "prefill", "prefill_batch"]
