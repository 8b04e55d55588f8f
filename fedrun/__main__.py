"""``python -m fedrun ...`` and ``torchrun -m fedrun ...``."""

import gc
import sys

# The verbs that build a diffusers model import torch and diffusers' model stack first (with what
# diffusers pulls in when installed: transformers, peft, scipy): about 700,000 long-lived objects.
# While they load, CPython's cyclic collector re-scans all of them at every full collection: 1.1-1.7
# s of each rank's start-up, for a few thousand objects freed. They are imported here with the
# collector paused, then frozen (later collections skip them; what the imports left as garbage,
# ~12,000 objects, stays) and the collector resumes as usual for the run itself
# (docs/benchmarks/startup/README.md). Nothing else changes: the same modules are imported, only
# earlier.
_MODEL_VERBS = ("train", "central", "finetune", "sample", "evaluate", "audit")
_NO_RUN = ("-h", "--help", "--print-config")


def _preload(argv: list) -> None:
    if not argv or argv[0] not in _MODEL_VERBS or any(a in _NO_RUN for a in argv):
        return
    gc.disable()
    try:
        import torch  # noqa: F401
        from diffusers import UNet2DModel  # noqa: F401  (diffusers' model stack)
    except ImportError:
        pass  # the verb itself reports what is missing
    finally:
        gc.freeze()
        gc.enable()


_preload(sys.argv[1:])

from fedrun.cli import main  # noqa: E402

sys.exit(main())
