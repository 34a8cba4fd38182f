"""The teacher-output cache: a frozen teacher's logits and features, computed once and shared.

In offline KD the teacher is frozen, so its outputs for a given image never change; recomputing
them is most of the cost of a student's step. With the cache on, the teacher's outputs for every
training sample are computed once (one inference pass, with a progress bar), stored in the teacher
store, and every later epoch, run and sweep job serves them by `batch["index"]`.

**Augmented data: stored views** (FKD, Shen & Xing, ECCV 2022). With random augmentation the
student sees a new view of each sample every epoch, and the teacher must see that very view. So
each sample's entry holds K views: the augmentation's parameters (crop box, flip; kdlab.data.replay)
and the teacher's outputs for the image they make. In training the dataset replays a stored view
of each sample each epoch instead of drawing a fresh one: the student sees exactly the image the
teacher saw. The views are drawn from a seed of their own (`teacher_cache.view_seed`), not the
run's, so runs over methods, temperatures and seeds share one entry, and differ in their order and
initialisation only. K trades augmentation diversity for build time and bytes (see the README).

- `plan` (kdlab.teacher_cache.plan): whether a run may use the cache, K, the budget, the key, and
  when `enabled=auto` builds.
- `build_entry` (kdlab.teacher_cache.build): the teacher's pass over every sample or view.
- `TeacherOutputs` and the on-disk format (kdlab.teacher_cache.tables): fp16 or top-k logits,
  memory-mapped, so an entry may be larger than memory and is shared by processes on one machine.
- `TeacherCache` (kdlab.teacher_cache.callback): serves the scheme and the stored views.

**Safety.** One process builds an entry while others wait on its file lock (sweeps, DDP ranks);
its files are written under temporary names and its marker last, so a killed build leaves nothing
that a later run would read.
"""

from kdlab.teacher_cache.build import EntryLayout, ViewPlan, build_entry
from kdlab.teacher_cache.callback import TeacherCache, cache_callback, load_or_build
from kdlab.teacher_cache.plan import CachePlan, plan, planned_teacher_samples, sweep_jobs
from kdlab.teacher_cache.tables import MARKER, TeacherOutputs, decode_logits, encode_logits, read_entry

__all__ = [
    "MARKER",
    "CachePlan",
    "EntryLayout",
    "TeacherCache",
    "TeacherOutputs",
    "ViewPlan",
    "build_entry",
    "cache_callback",
    "decode_logits",
    "encode_logits",
    "load_or_build",
    "plan",
    "planned_teacher_samples",
    "read_entry",
    "sweep_jobs",
]
