"""Class-conditional DiT on the digits (``task.name: dit``; sections ``dit`` and ``diffusion``).

What: a diffusers ``DiTTransformer2DModel`` (Peebles & Xie 2023: a transformer over image
patches, conditioned on timestep and class through adaLN-Zero) trained federatedly in pixel
space on the run's labelled images -- the digits, one channel, 8x8 or 16x16 -- to generate a
digit of a requested class. The whole transformer is the federated state.

Why: it is the third kind of training next to the unconditional U-Net (``ddpm``) and LoRA on
Stable Diffusion (``sd_lora``), and the one whose samples can be checked against what was asked
for: under label skew (``partition.method: dirichlet`` or ``shards``) a client sees few classes,
and whether the federated model still draws every class *on request* is a sharper question than
whether its unconditional samples cover them. It is also the proof that a task is a plugin: this
folder is the whole task, and no code outside it imports it or branches on it.

How it trains: the DDPM objective (``fedrun.tasks.diffusion.diffusion_loss``) with
``class_labels`` = the images' labels, a ``dit.class_dropout`` share of them replaced by the
null class (id ``dit.num_classes``, the extra row diffusers' class embedding keeps) so the
model also learns the unconditional prediction of classifier-free guidance. That draw comes from
the client's (seed, client, round) generator; diffusers' own train-mode label dropout, which
draws from the global generator, is switched off (``model.without_hidden_label_dropout``), so a
client trains identically on any rank and 1, 2, 3 ... processes give identical weights.

How it samples: classifier-free guidance (``dit.guidance_scale``) on the stock DDIM scheduler
built from the training schedule (or the training DDPM scheduler), step by step; diffusers'
``DiTPipeline`` needs a VAE and ImageNet's null class 1000 (``sampling`` says why it does not
fit). Sample grids (samples/round_NNNNN.png, EMA weights) have one row per class.

How it is exported: ``final/transformer/`` (``DiTTransformer2DModel.from_pretrained(final,
subfolder="transformer")``, the EMA weights), ``final/scheduler/`` (the training
``DDPMScheduler``), ``final/id2label.json`` (class id -> name, DiTPipeline's form) and
``final/fedrun_dit.json`` (null class id, guidance scale, sampler).

How it is scored (``eval.every`` during training, ``fedrun sample`` / ``fedrun evaluate`` on a
finished run): sample i asks for class i mod num_classes, chunk by chunk with noise seeded by
(eval.seed, chunk), so the set does not depend on the number of ranks. The score is FID/KID
against the held-out digits with the real-vs-real floor (``fedrun.eval.features``) plus the
task's own metric: ``label_accuracy``, how often the shipped digits classifier reads back the
requested label, and ``label_accuracy_per_class``.
"""

from fedrun.tasks.dit.task import DiTTask

__all__ = ["DiTTask"]
