"""`minimind eval lm-eval`: lm-evaluation-harness tasks on a minimind checkpoint.

`MiniMindLM` is registered with lm-eval as model "minimind" (its `@register_model`: lm-eval does
not read plugin entry points, so importing this module is what registers it). It implements the
three request types: `loglikelihood` (context, continuation) in padded batches, with the context's
trailing whitespace moved into the continuation and the continuation's tokens taken from the
encoding of the whole string, as lm-eval's own HF model does; `loglikelihood_rolling` over
non-overlapping windows, as `eval ppl`; `generate_until` through our KV-cached `infer.engine.Engine`
(greedy unless the task samples). Every sequence starts with the tokenizer's bos token, as in
pretraining. `--include-path` adds a directory of task yamls (local datasets work offline).
"""

import json
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # an optional (dev) dependency: say how to get it
    raise ImportError("minimind eval lm-eval needs lm-evaluation-harness: pip install lm-eval") from e

from minimind.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
from minimind.eval import EvalDataError, check_report, check_report_path, pick_device, write_report
from minimind.eval.ppl import windows
from minimind.outputs import OutputError


def run(args) -> int:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    try:
        check_report(args, [("--include-path", args.include_path)])
    except (CheckpointError, OutputError) as e:
        print(f"minimind eval lm-eval: {e}", file=sys.stderr)
        return 2
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    manager = None
    if args.include_path is not None:  # indexing lm-eval's thousands of built-in yamls takes ~20 s: skip if we can
        manager = TaskManager(include_path=str(args.include_path), include_defaults=False)
    if manager is None or any(t not in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=str(args.include_path) if args.include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if not tasks or unknown:
        print(f"minimind eval lm-eval: --tasks: unknown task(s) {', '.join(unknown) or '(none given)'} "
              f"(add a directory of task yamls with --include-path)", file=sys.stderr)
        return 2
    try:
        check_report_path(args.report)
        lm = MiniMindLM(ckpt=args.ckpt, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                        max_len=args.max_len, allow_nonfinite=args.allow_nonfinite)
    except (CheckpointError, EvalDataError) as e:
        print(f"minimind eval lm-eval: {e}", file=sys.stderr)
        return 2
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit  # lm-eval: < 1 a fraction
    out = simple_evaluate(model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=limit,
                          task_manager=manager, bootstrap_iters=args.bootstrap_iters, log_samples=False,
                          apply_chat_template=args.apply_chat_template)
    report = {"results": out["results"], "n-shot": out.get("n-shot"), "versions": out.get("versions"),
              "ckpt": str(args.ckpt), "tasks": tasks}
    write_report(json.loads(json.dumps(report, default=str)), args.report)
    return 0


@register_model("minimind")
class MiniMindLM(LM):
    def __init__(self, ckpt=None, model=None, tokenizer=None, device="auto", dtype=None, batch_size=16,
                 max_len=None, allow_nonfinite=False, **_lm_eval_extras):
        super().__init__()
        from minimind.checkpoint import tokenizer_dir
        from minimind.data.tokenizer import TokenizerError, load_tokenizer

        if model is None:
            if ckpt is None:
                raise CheckpointError("lm-eval model 'minimind' needs ckpt=CKPT (model_args)")
            torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else None
            model, _ = load_checkpoint(ckpt, device=pick_device(device), dtype=torch_dtype,
                                       allow_nonfinite=allow_nonfinite)
        if tokenizer is None:
            tok_dir = tokenizer_dir(resolve_checkpoint(ckpt)) if ckpt is not None else None
            if tok_dir is None:
                raise CheckpointError(f"{ckpt}: the checkpoint has no tokenizer.json")
            try:
                tokenizer = load_tokenizer(tok_dir, require_chat_template=False)
            except TokenizerError as e:
                raise CheckpointError(str(e)) from None
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        self.max_len = int(max_len or model.config.max_position_embeddings)
        self.engine_len = int(max_len) if max_len else None  # None: the engine's default cache length
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.prefix = [start] if start is not None else []
        self._engine = None

    @property
    def device(self):
        return next(self.model.parameters()).device

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _encode_context(self, text: str) -> list[int]:
        """bos + text, unless a chat template already put the bos token first."""
        ids = self._encode(text)
        return ids if ids[:1] == self.prefix else self.prefix + ids

    @property
    def tokenizer_name(self) -> str:  # lm-eval fingerprints its request cache with this
        return str(getattr(self.tokenizer, "name_or_path", "minimind")).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return (self.tokenizer.chat_template or "") if chat_template else ""

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = []
        for req in requests:
            context, continuation = req.args
            n = len(context) - len(context.rstrip())
            if n:  # " world" scores as one token with its space, not as a bare context space
                context, continuation = context[:-n], context[-n:] + continuation
            whole, ctx = self._encode(context + continuation), self._encode(context)
            pairs.append((self._encode_context(context), whole[len(ctx):]))
        return self._score(pairs, disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            tokens = self.prefix + self._encode(req.args[0])
            pieces = windows(tokens, len(self.prefix) or 1, self.max_len)
            # a window is (inputs, targets); as a pair: its first input is the context, targets the rest
            scores = self._score([(inp[:1], tgt) for inp, tgt in pieces], disable_tqdm=True)
            out.append(sum(s for s, _ in scores))
        return out

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), continuation is the greedy one) per pair."""
        seqs = [(ctx + cont)[-(self.max_len + 1):] for ctx, cont in pairs]
        n_cont = [min(len(cont), len(s) - 1) for (_, cont), s in zip(pairs, seqs)]
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        out: list[tuple[float, bool]] = [(0.0, True)] * len(seqs)
        for start in tqdm(range(0, len(order), self.batch_size), desc="loglikelihood", disable=disable_tqdm):
            idx = order[start : start + self.batch_size]
            width = len(seqs[idx[0]]) - 1
            ids = torch.zeros(len(idx), width, dtype=torch.long, device=self.device)
            for r, i in enumerate(idx):
                ids[r, : len(seqs[i]) - 1] = torch.tensor(seqs[i][:-1], device=self.device)
            logits = self.model(ids).logits  # (B, T, V); right padding is invisible to earlier tokens
            for r, i in enumerate(idx):
                n, end = n_cont[i], len(seqs[i]) - 1
                logp = F.log_softmax(logits[r, end - n : end].float(), dim=-1)  # (n, V)
                target = torch.tensor(seqs[i][-n:], device=self.device) if n else torch.zeros(0, dtype=torch.long)
                chosen = logp.gather(1, target.view(-1, 1).to(logp.device)).sum().item()
                out[i] = (chosen, bool((logp.argmax(-1) == target.to(logp.device)).all()))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from infer.engine import Engine, SamplingParams

        if self._engine is None:
            self._engine = Engine(self.model, self.tokenizer, max_batch=self.batch_size, max_len=self.engine_len)
        prompts, params = [], []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            max_new = min(int(kwargs.pop("max_gen_toks", 256)), self._engine.max_len - 1)
            sample = kwargs.get("do_sample", False)
            temperature = float(kwargs.get("temperature", 1.0)) if sample else 0.0
            room = self._engine.max_len - max_new
            prompts.append(self._encode_context(context)[-room:])
            params.append(SamplingParams(max_new_tokens=max_new, temperature=temperature,
                                         stop=[until] if isinstance(until, str) else list(until)))
        done = self._engine.generate(prompts, params)
        return [c.text for c in done]
