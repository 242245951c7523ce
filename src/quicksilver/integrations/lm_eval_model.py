"""The lm-evaluation-harness (0.4.x) model ``quicksilver``: every request runs through the engine.

    quicksilver-lm-eval --model quicksilver \\
        --model_args pretrained=smollm2-135m,preset=all,dtype=float32 --tasks ...

Requests are scored exactly as lm-eval's own ``hf`` model scores them (the same
tokenization, the same left truncation to ``max_length``, the same rolling windows), so
with preset ``off`` the numbers equal ``hf``'s. Loglikelihood requests of a batch run as
one engine call over several sequences (segments); with fusion on, each sequence runs
alone, since fusion decides within one sequence. Generation uses ``quicksilver.generate``.
"""

from __future__ import annotations

import json
import logging

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from ..config import Config
from ..decoding import generate
from ..ledger import Ledger
from ..errors import QuicksilverError
from ..evaluate import make_engine

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048  # lm-eval's default where neither config nor tokenizer gives one


def build_config(preset: str = "off", config: str | None = None, settings: list[str] = ()) -> Config:
    """The engine config from model args: a preset or a config file, then ``section.field=value`` settings."""
    base = Config.load(config) if config else Config.preset(preset)
    return base.with_settings(list(settings)) if settings else base


def _setting_value(value) -> str:
    # lm-eval has already parsed "true"/"3"/"0.1"/"none" into Python values; --set parses strings.
    return "none" if value is None else str(value)


@register_model("quicksilver")
class QuickSilverLM(TemplateLM):
    """lm-eval model running a frozen HF model through QuickSilver's engine.

    Parameters (lm-eval ``--model_args``)
    ----------
    pretrained : str, default "smollm2-135m"
        Anything ``quicksilver.load_model`` takes (offline name, .gguf file, folder, hub id).
    preset : str, default "off"
        A preset name (``off``, ``halting``, ``kvskip``, ``fusion``, ``amq``, ``all``, ``int8``, ``int4``).
    config : str, optional
        A config JSON file (as ``Config.save`` writes); replaces ``preset``.
    set : str, optional
        One ``section.field=value`` setting; any number more as direct model args,
        e.g. ``halting.threshold=0.13,kv.recent_window=512``.
    dtype : str, default "float32"; device : str, default "cpu"; device_map : str, optional
        As in ``load_model``.
    batch_size : int, default 1
        Sequences per engine call (``auto`` means 8).
    max_length : int, optional
        Context length; default the model's (lm-eval's rule), else 2048.
    max_gen_toks : int, default 256
    add_bos_token : bool, optional
        Force BOS on or off in tokenization; default: the tokenizer's own behaviour.
    prefix_token_id : int, optional
        Token that stands for an empty context; default BOS, else EOS.
    """

    def __init__(
        self,
        pretrained: str = "smollm2-135m",
        preset: str = "off",
        config: str | None = None,
        dtype: str = "float32",
        device: str | None = "cpu",
        device_map: str | None = None,
        batch_size: int | str | None = 1,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        add_bos_token: bool | None = None,
        prefix_token_id: int | None = None,
        **settings,
    ):
        super().__init__()
        from ..models import load_model

        assignments = []
        if "set" in settings:
            assignments.append(str(settings.pop("set")))
        for key, value in settings.items():
            if "." not in key:
                raise QuicksilverError(f"unknown quicksilver model arg {key!r} (config settings are SECTION.FIELD=VALUE)")
            assignments.append(f"{key}={_setting_value(value)}")
        self.qs_config = build_config(preset, config, assignments)
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            # As lm-eval's hf model: its command line asks for cuda by default; use what exists.
            if device is not None:
                log.warning("device %s is not available: using %s", device, "cpu")
            device = "cuda" if torch.cuda.is_available() else "cpu"
        kwargs = {"device_map": device_map} if device_map else {}
        self._model, self.tokenizer = load_model(pretrained, dtype=dtype, device=device, **kwargs)
        self.engine = make_engine(self._model, self.tokenizer, self.qs_config)
        self.pretrained = pretrained
        self._device = next(self._model.parameters()).device
        self._max_length = max_length
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self._prefix_token_id = prefix_token_id
        size = str(batch_size if batch_size is not None else 1)
        self._batch_size = 8 if size.startswith("auto") else max(int(size), 1)
        if max_batch_size is not None:
            self._batch_size = min(self._batch_size, int(max_batch_size))
        self.ledger = Ledger(n_layers=self.engine.spec.n_layers)  # everything the engine ran, over all requests

    # What TemplateLM asks of a model ------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self._prefix_token_id is not None:
            return self._prefix_token_id
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        if self._max_length:
            return int(self._max_length)
        from lm_eval.models.utils import resolve_max_length

        return resolve_max_length(self._model.config, self.tokenizer, default=DEFAULT_MAX_LENGTH)

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids as lm-eval's ``hf`` model encodes them (no second BOS on a BOS-prefixed string)."""
        special = add_special_tokens if add_special_tokens is not None else self.add_bos_token
        bos = self.tokenizer.decode(self.prefix_token_id)
        if add_special_tokens is None and bos and string.startswith(bos):
            special = False
        return self.tokenizer.encode(string, **({} if special is None else {"add_special_tokens": special}))

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # Scoring --------------------------------------------------------------------------------

    @torch.inference_mode()
    def _score_batch(self, inputs: list[list[int]], cont_lens: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Log-probabilities (n, vocab) at the last ``cont_len`` positions of each input, one engine call."""
        lengths = [len(x) for x in inputs]
        starts = [sum(lengths[:i]) for i in range(len(inputs))]
        ids = torch.tensor([t for x in inputs for t in x], dtype=torch.long, device=self.device)
        pos = torch.cat([torch.arange(n, device=self.device) for n in lengths])
        segments = [(s, s + n) for s, n in zip(starts, lengths)]
        rows = torch.cat([torch.arange(s + n - c, s + n, device=self.device) for s, n, c in zip(starts, lengths, cont_lens)])
        logits, ledger = self.engine.run(ids, pos, segments, [None] * len(inputs), rows)
        self.ledger.merge(ledger)
        logp = F.log_softmax(logits.float(), dim=-1)
        return list(torch.split(logp, cont_lens))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(log p(continuation | context), greedy?) per request, longest first in batches of ``batch_size``."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        per_call = 1 if self.qs_config.fusion.enabled else self._batch_size
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for b in range(0, len(order), per_call):
            chunk = order[b : b + per_call]
            inputs, conts = [], []
            for i in chunk:
                _, context_enc, continuation_enc = requests[i]
                if not continuation_enc or len(continuation_enc) > self.max_length:
                    raise QuicksilverError(f"a continuation of {len(continuation_enc)} tokens does not fit max_length {self.max_length}")
                # As lm-eval's hf model: keep the last max_length+1 tokens, feed all but the last.
                inputs.append((context_enc + continuation_enc)[-(self.max_length + 1) :][:-1])
                conts.append(continuation_enc)
            for i, cont, logp in zip(chunk, conts, self._score_batch(inputs, [len(c) for c in conts])):
                target = torch.tensor(cont, device=logp.device)
                greedy = bool((logp.argmax(-1) == target).all())
                answer = (float(logp.gather(1, target[:, None]).sum()), greedy)
                results[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each text, over lm-eval's disjoint rolling windows of ``max_length``."""
        windows, owner = [], []
        for r_i, (text,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(text)
            for ctx, cont in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, context_len=1),
            ):
                windows.append((None, ctx, cont))
                owner.append(r_i)
        totals = [0.0] * len(requests)
        for r_i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[r_i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy or sampled continuations through ``quicksilver.generate``, cut at the stop strings."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(requests)
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        for members in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[members[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = int(kwargs.pop("max_gen_toks"))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            max_ctx = self.max_length - max_new
            if max_ctx <= 0:
                raise QuicksilverError(f"max_gen_toks {max_new} leaves no room for context in max_length {self.max_length}")
            for b in range(0, len(members), self._batch_size):
                chunk = members[b : b + self._batch_size]
                prompts = [self.tok_encode(requests[i].args[0])[-max_ctx:] for i in chunk]
                result = generate(
                    self.engine, prompts, max_new_tokens=max_new, temperature=temperature, top_p=kwargs.get("top_p"),
                    top_k=kwargs.get("top_k"), seed=kwargs.get("seed"), eos_token_id=self.eot_token_id,
                    stop_strings=[s for s in until if s], tokenizer=self.tokenizer,
                )
                for i, tokens in zip(chunk, result.tokens):
                    text = postprocess_generated_text(self.tok_decode(tokens), until, None)
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    def get_model_info(self) -> dict:
        """What lm-eval records about the model: its name, the engine config and what the engine ran."""
        return {
            "model_name": self.pretrained,
            "quicksilver_config": self.qs_config.to_dict(),
            "quicksilver_ledger": self.ledger.as_dict(),
        }
