"""One loaded model with its data and caches: what the command line and the app drive.

The expensive things are computed once and kept: the structure map, the calibration statistics
(one pass collects what every requested criterion needs; a later criterion re-uses them when they
cover it), scores per (criterion, reduction), and the dense perplexity. Plans are allocated on the
cached scores, so changing a ratio never re-reads the data.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .apply.masking import masked
from .apply.preview import LivePreview
from .apply.pruning import prune_model
from .catalogue import CRITERIA, RECOVERY_STEPS
from .data import TextSource, ensure_disjoint, token_windows
from .evaluate import PerplexityStep, generate, perplexity, token_logprobs
from .model.families import family_for
from .model.loading import Workspace, load_model
from .model.structure import StructureMap
from .planning.plan import Plan, allocate
from .planning.selection import Selection, flops_per_token, param_counts
from .progress import Progress
from .recovery.steps import RecoveryContext, run_steps
from .scoring.base import SCORED_KINDS, ScoreContext, Scores
from .scoring.statistics import Needs, Statistics, collect_statistics
from .text_safety import check_length


@dataclass
class Explorer:
    """A workspace plus calibration/evaluation windows and the caches built on them."""

    workspace: Workspace
    calibration: torch.Tensor  # (n, L) token windows
    evaluation: torch.Tensor  # (n, L) token windows
    seed: int = 0
    structure: StructureMap = field(init=False)
    _stats: Statistics | None = field(default=None, init=False, repr=False)
    _scores: dict[tuple[str, str, tuple[str, ...]], Scores] = field(
        default_factory=dict, init=False, repr=False
    )
    _dense_ppl: float | None = field(default=None, init=False, repr=False)
    _live: LivePreview | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.structure = StructureMap(self.workspace.model, family_for(self.workspace.model))

    @classmethod
    def from_texts(
        cls,
        workspace: Workspace,
        calibration_text: str,
        evaluation_text: str,
        *,
        calibration_windows: int = 10,
        calibration_length: int = 64,
        evaluation_length: int = 256,
        evaluation_windows: int | None = None,
        seed: int = 0,
    ) -> Explorer:
        """Cut the texts into windows; refuses calibration text that overlaps the evaluation."""
        ensure_disjoint(calibration_text, evaluation_text)
        tok = workspace.tokenizer
        calib = token_windows(
            tok, calibration_text, calibration_length, calibration_windows, seed=seed
        )
        evaluation = token_windows(tok, evaluation_text, evaluation_length, evaluation_windows)
        return cls(workspace, calib, evaluation, seed=seed)

    @classmethod
    def open(
        cls,
        plan: Plan,
        *,
        dtype: str = "float32",
        device: str | None = None,
        evaluation_length: int = 256,
        evaluation_windows: int | None = None,
        progress: Progress | None = None,
        trust_remote_code: bool = False,
        max_text_chars: int | None = None,
    ) -> Explorer:
        """Load the plan's model and read its calibration and evaluation texts.

        The one way into the library from a recipe: the CLI, the app and the benchmarks all open
        their session here, so they cut the same windows from the same texts. Only the plan's
        model, texts, window settings and seed are read; ``plan.check`` is the caller's business.
        ``max_text_chars``: refuse longer texts (a shared server bounds what one request reads).
        """
        report = progress or (lambda *_: None)
        report(0.0, f"Loading {plan.model}")
        workspace = load_model(
            plan.model,
            dtype=dtype,
            device=device,
            progress=lambda f, message: report(0.6 * f, message),
            trust_remote_code=trust_remote_code,
        )
        report(0.65, "Reading calibration text")
        calibration = TextSource.from_dict(plan.calibration).read("calibration", workspace)
        check_length(calibration, "calibration", max_text_chars)
        report(0.8, "Reading evaluation text")
        evaluation = TextSource.from_dict(plan.evaluation).read("evaluation", workspace)
        check_length(evaluation, "evaluation", max_text_chars)
        return cls.from_texts(
            workspace,
            calibration,
            evaluation,
            calibration_windows=plan.calibration_windows,
            calibration_length=plan.calibration_length,
            evaluation_length=evaluation_length,
            evaluation_windows=evaluation_windows,
            seed=plan.seed,
        )

    @property
    def model(self):
        return self.workspace.model

    # -- statistics and scores ----------------------------------------------------------------------
    def statistics(self, needs: Needs, progress: Progress | None = None) -> Statistics:
        """Calibration statistics covering ``needs``; collected at most once per new need."""
        if self._stats is not None and self._stats.covers(needs):
            return self._stats
        if self._stats is not None:
            needs = needs | self._stats.needs
        self._stats = collect_statistics(
            self.model, self.structure, self.calibration, needs, batch_size=8, progress=progress
        )
        return self._stats

    def scores(
        self,
        criterion: str,
        reduction: str = "sum",
        progress: Progress | None = None,
        *,
        hidden: bool = False,
    ) -> Scores:
        """Scores of every group kind; cached, so switching back to a criterion is instant.

        Hidden channels are scored only when ``hidden`` asks for them: only plans that cut them
        need those scores.
        """
        crit = CRITERIA[criterion]
        kinds = SCORED_KINDS + (("hidden",) if hidden else ())
        key = (criterion, reduction if crit.uses_reduction else "-", kinds)
        if key not in self._scores:
            needs = crit.needs | Needs(embeddings=hidden and crit.needs.gradients)
            stats = self.statistics(needs, progress) if needs != Needs() else None
            ctx = ScoreContext(
                self.model, self.structure, stats, reduction=reduction, seed=self.seed, kinds=kinds
            )
            self._scores[key] = crit.score(ctx)
        return self._scores[key]

    def select(self, plan: Plan, progress: Progress | None = None) -> Selection:
        """The selection ``plan`` gives on this model: its criterion's scores, allocated."""
        plan.check(self.structure.num_layers, CRITERIA)
        scores = self.scores(plan.criterion, plan.reduction, progress, hidden=plan.hidden_ratio > 0)
        return allocate(plan, self.structure, scores)

    # -- preview ------------------------------------------------------------------------------------
    def dense_perplexity(self, progress: Progress | None = None) -> float:
        if self._dense_ppl is None:
            self._dense_ppl = perplexity(self.model, self.evaluation, progress=progress)
        return self._dense_ppl

    @property
    def live(self) -> LivePreview:
        """The incremental preview over the evaluation windows (built on first use)."""
        if self._live is None:
            self._live = LivePreview(self.model, self.structure, self.evaluation, batch_size=1)
        return self._live

    def iter_perplexity(self, selection: Selection) -> Iterator[PerplexityStep]:
        """The pruned view's running perplexity, batch by batch, recomputing only what changed."""
        return self.live.run(selection)

    def perplexity(self, selection: Selection, progress: Progress | None = None) -> float:
        """Perplexity of the pruned view (masks only; the shared weights are not touched)."""
        if selection.is_empty:
            return self.dense_perplexity(progress)
        step = None
        for step in self.iter_perplexity(selection):
            if progress:
                progress(step.done / step.total, f"perplexity {step.perplexity:.2f}")
        return step.perplexity

    def generate(
        self, selection: Selection, prompt: str, **kwargs
    ) -> tuple[str, torch.Tensor, int]:
        """Continuation of ``prompt`` by the pruned view: its text, all ids, the prompt's length."""
        tok = self.workspace.tokenizer
        with masked(self.model, self.structure, selection):
            ids, prompt_length = generate(self.model, tok, prompt, **kwargs)
        return tok.decode(ids[prompt_length:], skip_special_tokens=True), ids, prompt_length

    def logprob_drop(self, selection: Selection, ids: torch.Tensor) -> torch.Tensor:
        """How much each token's log-probability fell under pruning (positive = hurt)."""
        dense = token_logprobs(self.model, ids)
        with masked(self.model, self.structure, selection):
            pruned = token_logprobs(self.model, ids)
        return dense - pruned

    def recover(
        self, selection: Selection, steps: list[dict], progress: Progress | None = None
    ) -> tuple[torch.nn.Module, list[dict]]:
        """A sliced copy of the model with the plan's recovery steps applied, and their reports.

        Recovery changes the kept weights, so unlike the preview it works on a physical copy; the
        shared model is left as it is.
        """
        pruned = prune_model(self.model, self.structure, selection)
        ctx = RecoveryContext(
            self.model, pruned, self.structure, selection, self.calibration, self._stats, progress
        )
        return pruned, run_steps(steps, ctx, RECOVERY_STEPS)

    def sizes(self, selection: Selection, context: int | None = None) -> dict[str, float]:
        """Parameter counts and FLOPs per token before and after ``selection``."""
        s = self.structure
        context = context or self.evaluation.shape[1]
        before, after = param_counts(s, Selection()), param_counts(s, selection)
        return {
            "params_before": before["total"],
            "params_after": after["total"],
            "block_params_before": before["blocks"],
            "block_params_after": after["blocks"],
            "flops_before": flops_per_token(s, Selection(), context),
            "flops_after": flops_per_token(s, selection, context),
        }
