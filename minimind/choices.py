"""Names the command lines offer, each written once here and imported where it is checked (no torch
import, so `minimind --help` stays quick). Stage names live with the stage records (recipes.py)."""

KERNELS = ("auto", "torch", "triton", "liger")  # minimind.kernels.dispatch's implementations
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
OPTIMIZERS = ("adamw", "muon")  # minimind.optim.build_optimizer
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")  # torch.compile(mode=...)
SCHEDULES = ("auto", "cosine", "wsd")  # minimind.schedule.lr_at
