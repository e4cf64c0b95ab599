"""The adapter toolbox: ``extract``, ``resize``, ``merge`` and ``bake``, DoRA-aware, each error measured.

One module a job, each a Python function and a ``dora-diffusion`` subcommand (``cli.py``):

- ``bake``: a DoRA (or LoRA) as a plain LoRA of rank r, with a recommended rank for an error threshold.
- ``resize``: an adapter's rank lowered (one rank, or per module as kohya's dynamic methods), DoRA ``m`` exact.
- ``extract``: a DoRA or LoRA from a fine-tuned diffusers folder and its base, one module at a time.
- ``merge``: adapters at strengths into one file (LoRAs stacked exactly, else through the merged weights) or into
  the base pipeline (``merge_into_base``).

Shared: ``svd`` (truncations, energy ranks, the DoRA fit), ``weights`` (model folders read one weight at a time, an
adapter's change of a weight by the layer core's formula), ``output`` (checked output paths, the error report,
files with metadata saying what made them). Reads every dialect ``adapter_io.read_adapter`` reads; writes diffusers
or kohya files that ``load_dora_weights`` reloads.
"""

from dora_diffusion.tools.bake import bake
from dora_diffusion.tools.extract import extract
from dora_diffusion.tools.merge import merge_adapters, merge_into_base
from dora_diffusion.tools.output import Report
from dora_diffusion.tools.resize import resize
from dora_diffusion.tools.weights import ModelFolder, adapted_weights

__all__ = ["ModelFolder", "Report", "adapted_weights", "bake", "extract", "merge_adapters", "merge_into_base", "resize"]
