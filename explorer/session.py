"""One loaded model with its data and caches: what the command line and the app drive.

The expensive things are computed once and kept: the structure map, the calibration statistics
(one pass collects what every requested criterion needs; a later criterion re-uses them when they
cover it), scores per (criterion, reduction), and the dense perplexity. Plans are allocated on the
cached scores, so changing a ratio never re-reads the data.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .apply.masking import masked
from .apply.preview import LivePreview
from .apply.pruning import prune_model
from .apply.sensitivity import Point, Sensitivity, sweep
from .catalogue import CRITERIA, RECOVERY_STEPS
from .data import TextSource, builtin_text, ensure_disjoint, split_heldout, token_windows
from .errors import DataError
from .evaluate import PerplexityStep, generate, perplexity, token_logprobs
from .model.families import family_for
from .model.loading import Workspace, load_model
from .model.structure import StructureMap
from .planning.plan import Plan, allocate
from .planning.selection import Selection, flops_per_token, param_counts
from .progress import Progress
from .recovery.live import Compensation, live_needs, split_steps, steps_key
from .recovery.steps import RecoveryContext, run_steps
from .scoring.base import SCORED_KINDS, ScoreContext, Scores
from .scoring.statistics import Needs, Statistics, collect_statistics
from .text_safety import check_length

HELDOUT_WINDOWS = 4
OFFDOMAIN_WINDOWS = 20


def heldout_windows_of(tokenizer, text: str, length: int, n: int) -> torch.Tensor | None:
    """Up to ``n`` windows of ``length`` tokens in order from ``text`` (None if not one fits)."""
    try:
        return token_windows(tokenizer, text, length, None)[:n]
    except DataError:
        return None


def _final(stream: Iterator[PerplexityStep], progress: Progress | None, label: str) -> float:
    """The last perplexity of a running stream, each step reported through ``progress``."""
    step = None
    for step in stream:
        if progress:
            progress(step.done / step.total, f"{label} {step.perplexity:.2f}")
    return step.perplexity


@dataclass
class Explorer:
    """A workspace plus calibration/evaluation windows and the caches built on them."""

    workspace: Workspace
    calibration: torch.Tensor  # (n, L) token windows
    evaluation: torch.Tensor  # (n, L) token windows
    seed: int = 0
    # (n, L) windows of the calibration text's held-out tail (``split_heldout``): never scored
    # on, fitted to or reported as quality, so settings are measured here. None: no such text
    # (a session built from bare windows), and the evaluation windows stand in, said so.
    heldout: torch.Tensor | None = None
    structure: StructureMap = field(init=False)
    _stats: Statistics | None = field(default=None, init=False, repr=False)
    _scores: dict[tuple[str, str, tuple[str, ...]], Scores] = field(
        default_factory=dict, init=False, repr=False
    )
    _dense_ppl: float | None = field(default=None, init=False, repr=False)
    _live: LivePreview | None = field(default=None, init=False, repr=False)
    _compensations: dict[str, Compensation] = field(default_factory=dict, init=False, repr=False)
    _sensitivity: dict[str, Sensitivity] = field(default_factory=dict, init=False, repr=False)
    _offdomain: dict[tuple[int, int], LivePreview] = field(
        default_factory=dict, init=False, repr=False
    )

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
        heldout_windows: int = HELDOUT_WINDOWS,
        seed: int = 0,
    ) -> Explorer:
        """Cut the texts into windows; refuses calibration text that overlaps the evaluation.

        The calibration windows come from the first nine tenths of the calibration text; up to
        ``heldout_windows`` windows of ``evaluation_length`` tokens from its last tenth are the
        held-out slice that sweeps and recovery checks measure on.
        """
        ensure_disjoint(calibration_text, evaluation_text)
        tok = workspace.tokenizer
        fit, held = split_heldout(calibration_text)
        calib = token_windows(tok, fit, calibration_length, calibration_windows, seed=seed)
        evaluation = token_windows(tok, evaluation_text, evaluation_length, evaluation_windows)
        return cls(
            workspace,
            calib,
            evaluation,
            seed=seed,
            heldout=heldout_windows_of(tok, held, evaluation_length, heldout_windows),
        )

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
        key = self._score_key(criterion, reduction, hidden)
        kinds = key[2]
        if key not in self._scores:
            needs = crit.needs | Needs(embeddings=hidden and crit.needs.gradients)
            stats = self.statistics(needs, progress) if needs != Needs() else None
            ctx = ScoreContext(
                self.model,
                self.structure,
                stats,
                reduction=reduction,
                seed=self.seed,
                kinds=kinds,
                progress=progress,
            )
            self._scores[key] = crit.score(ctx)
        return self._scores[key]

    @staticmethod
    def _score_key(criterion: str, reduction: str, hidden: bool) -> tuple[str, str, tuple]:
        crit = CRITERIA[criterion]
        kinds = SCORED_KINDS + (("hidden",) if hidden else ())
        return criterion, reduction if crit.uses_reduction else "-", kinds

    def ready(self, plan: Plan) -> bool:
        """Whether ``select(plan)`` is quick: its scores (and sweep) were computed already, so no
        calibration pass, scoring or sensitivity sweep would run (a picture may then show it)."""
        hidden = plan.hidden_ratio > 0
        needed = [self._score_key(plan.criterion, plan.reduction, hidden)]
        if plan.depth and plan.depth_criterion not in (None, plan.criterion):
            needed.append(self._score_key(plan.depth_criterion, plan.reduction, False))
        swept = plan.allocation != "sensitivity" or self.known_sensitivity(plan) is not None
        return swept and all(key in self._scores for key in needed)

    def select(self, plan: Plan, progress: Progress | None = None) -> Selection:
        """The selection ``plan`` gives on this model: its criterion's scores, allocated (a
        sensitivity plan runs its sweep once)."""
        plan.check(self.structure.num_layers, CRITERIA)
        scores = self.scores(plan.criterion, plan.reduction, progress, hidden=plan.hidden_ratio > 0)
        if plan.depth and plan.depth_criterion not in (None, plan.criterion):
            depth_scores = self.scores(plan.depth_criterion, plan.reduction, progress)
            scores = {**scores, "layer": depth_scores["layer"]}
        sens = self.sensitivity(plan, progress) if plan.allocation == "sensitivity" else None
        return allocate(plan, self.structure, scores, sens)

    # -- sensitivity --------------------------------------------------------------------------------
    def sensitivity_request(self, plan: Plan, kinds: Sequence[str] | None = None) -> Sensitivity:
        """The (empty) sweep ``plan`` asks for: its criterion, grid, windows and live steps."""
        if kinds is None:
            attention = "kv" if plan.attention_unit == "kv" else "head"
            kinds = ["mlp"] + ([attention] if plan.head_ratio != 0 else [])
        live, _ = split_steps(plan.recovery)
        crit = CRITERIA[plan.criterion]
        windows, text = self.settings_windows
        n = min(plan.sensitivity_windows, windows.shape[0])
        return Sensitivity(
            criterion=plan.criterion,
            reduction=plan.reduction if crit.uses_reduction else "-",
            kinds=list(kinds),
            ratios=[float(r) for r in plan.sensitivity_ratios],
            windows=[n, int(windows.shape[1])],
            steps=live,
            text=text,
        )

    @property
    def settings_windows(self) -> tuple[torch.Tensor, str]:
        """(windows, what they are) that settings are measured on: the held-out calibration
        slice, or the evaluation windows where the session has none."""
        if self.heldout is not None:
            return self.heldout, "held-out calibration"
        return self.evaluation, "evaluation"

    def iter_sensitivity(
        self, plan: Plan, kinds: Sequence[str] | None = None, progress: Progress | None = None
    ) -> Iterator[Point]:
        """Measure (or replay from the cache) the sweep ``plan`` asks for, point by point.

        Cached per (criterion, reduction, kinds, ratios, windows, live steps) once complete; a
        sweep stopped half way is not kept.
        """
        request = self.sensitivity_request(plan, kinds)
        if request.key in self._sensitivity:
            yield from self._sensitivity[request.key].points
            return
        scores = self.scores(plan.criterion, plan.reduction, progress)
        t0 = time.perf_counter()
        stream = sweep(
            self.model,
            self.structure,
            scores,
            self.settings_windows[0][: request.windows[0]],
            plan,
            kinds=request.kinds,
            ratios=request.ratios,
            compensation=self.compensation(request.steps, progress),
            progress=progress,
        )
        request.dense_perplexity = next(stream)
        for point in stream:
            request.points.append(point)
            yield point
        request.seconds = time.perf_counter() - t0
        self._sensitivity[request.key] = request

    def sensitivity(self, plan: Plan, progress: Progress | None = None) -> Sensitivity:
        """The complete sweep ``plan`` asks for (measured once, then cached)."""
        for _ in self.iter_sensitivity(plan, progress=progress):
            pass
        return self.known_sensitivity(plan)

    def known_sensitivity(
        self, plan: Plan, kinds: Sequence[str] | None = None
    ) -> Sensitivity | None:
        """The sweep ``plan`` asks for if it was measured already (nothing is measured)."""
        return self._sensitivity.get(self.sensitivity_request(plan, kinds).key)

    def add_sensitivity(self, sens: Sensitivity) -> None:
        """Use a sweep measured before (e.g. loaded from the CLI's JSON) instead of measuring."""
        self._sensitivity[sens.key] = sens

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

    def compensation(
        self, steps: Sequence[dict], progress: Progress | None = None
    ) -> Compensation | None:
        """The live recovery steps among ``steps``, ready to patch the preview (None: none).

        Cached per list of steps, so their patches are reused while the plan changes.
        """
        live, _ = split_steps(steps)
        if not live:
            return None
        stats = self.statistics(live_needs(live), progress)
        key = steps_key(live)
        cached = self._compensations.get(key)
        if cached is None or cached.stats is not stats:
            cached = self._compensations[key] = Compensation(
                self.model, self.structure, stats, live
            )
        return cached

    def iter_perplexity(
        self, selection: Selection, steps: Sequence[dict] = ()
    ) -> Iterator[PerplexityStep]:
        """The pruned view's running perplexity, batch by batch, recomputing only what changed.

        ``steps``: the plan's recovery steps; the live ones (``explorer.recovery.live``) are
        applied, so the number is the one Export writes when no other step is listed.
        """
        return self.live.run(selection, self.compensation(steps))

    def perplexity(
        self, selection: Selection, progress: Progress | None = None, steps: Sequence[dict] = ()
    ) -> float:
        """Perplexity of the pruned view with the live ``steps`` (the shared weights come back)."""
        if selection.is_empty:
            return self.dense_perplexity(progress)
        return _final(self.iter_perplexity(selection, steps), progress, "perplexity")

    def offdomain(self, windows: int = OFFDOMAIN_WINDOWS, length: int = 256) -> torch.Tensor:
        """Windows of the second text domain (``builtin_text("offdomain")``, Wikipedia leads).

        Calibration and recovery never read it, so a quality figure here next to the evaluation
        text's tells repair from adaptation to the calibration text's domain.
        """
        return self._offdomain_preview(windows, length).windows

    def _offdomain_preview(self, windows: int, length: int = 256) -> LivePreview:
        key = (windows, length)
        if key not in self._offdomain:
            text = builtin_text("offdomain")
            ids = token_windows(self.workspace.tokenizer, text, length, windows)
            self._offdomain[key] = LivePreview(self.model, self.structure, ids, batch_size=1)
        return self._offdomain[key]

    def iter_offdomain(
        self, selection: Selection, steps: Sequence[dict] = (), windows: int = OFFDOMAIN_WINDOWS
    ) -> Iterator[PerplexityStep]:
        """``iter_perplexity`` on the second domain (its own incremental preview)."""
        preview = self._offdomain_preview(windows)
        return preview.run(selection, self.compensation(steps))

    def offdomain_perplexity(
        self,
        selection: Selection,
        steps: Sequence[dict] = (),
        model: torch.nn.Module | None = None,
        windows: int = OFFDOMAIN_WINDOWS,
        progress: Progress | None = None,
    ) -> float:
        """Perplexity on the second domain: of ``selection`` with the live ``steps`` (the preview's
        number there), or of a separate ``model`` (e.g. after recovery) when given."""
        if model is not None:
            return perplexity(model, self.offdomain(windows))
        stream = self.iter_offdomain(selection, steps, windows)
        return _final(stream, progress, "off-domain perplexity")

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
        shared model is left as it is. Each report carries the held-out calibration perplexity
        before and after its step, and a ``warning`` when the step made it worse.
        """
        live, _ = split_steps(steps)
        if live:
            self.statistics(live_needs(live), progress)  # the statistics the preview reads
        pruned = prune_model(self.model, self.structure, selection)
        ctx = RecoveryContext(
            self.model,
            pruned,
            self.structure,
            selection,
            self.calibration,
            self._stats,
            progress,
            heldout=self.heldout,
            tokenizer=self.workspace.tokenizer,
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
