"""The command-line options of ``structprune prune``."""
from __future__ import annotations





def add_arguments(p) -> None:
    """The options of ``structprune prune`` (besides those every training command takes: ``runs._common``)."""
    from structprune.cli import fraction
    from structprune.qa.layerdrop import keep_layers_arg

    p.add_argument("--model", default=None,
                   help="the fine-tuned (teacher) model directory (default: the bundled MiniLM, whose QA head is "
                        "untrained: fine-tune it first for a meaningful teacher)")
    p.add_argument("--method", choices=["random", "gain", "l0", "layerdrop"], required=True,
                   help="how the kept heads and units are chosen: random, gain (gradient importance, Michel et al.) "
                        "or l0 (trained hard-concrete gates); or layerdrop: whole layers kept (--keep-layers), a "
                        "shallower plain transformers student")
    p.add_argument("--keep-layers", type=keep_layers_arg, default=None, metavar="K|I,J,...",
                   help="--method layerdrop: how many layers to keep (every other, evenly spread, with the last; see "
                        "structprune.model.layer_drop) or which (0-based indices, e.g. 0,2,4); required with layerdrop (default: "
                        "none, for the other methods)")
    p.add_argument("--heads", type=fraction, default=None,
                   help="fraction of heads KEPT, in (0, 1] (e.g. 0.5); with a speed target: at most this fraction "
                        "(default: all, with a budget; otherwise required)")
    p.add_argument("--ffn", type=fraction, default=None,
                   help="fraction of FFN units KEPT, in (0, 1] (e.g. 0.3); with a speed target: at most this fraction "
                        "(default: all, with a budget; otherwise required)")
    p.add_argument("--per-layer", action="store_true", help="the target holds in every layer (default: global)")
    p.add_argument("--speedup", type=float, default=None,
                   help="prune to this predicted end-to-end speed-up over the dense model (>= 1), at --at "
                        "(default: no speed target)")
    p.add_argument("--latency-ms", type=float, default=None,
                   help="prune to this predicted latency (ms), at --at (default: no latency target)")
    p.add_argument("--at", default=None, metavar="BxL",
                   help="input shape of the speed target, e.g. 8x128 (default: the --latency-table's)")
    p.add_argument("--max-params", type=fraction, default=None,
                   help="keep at most this fraction of the heads' and FFN units' parameters (alone or with a speed "
                        "target; default: no parameter budget)")
    p.add_argument("--multiple-of", type=int, default=1, metavar="N",
                   help="with a budget: keep every layer's FFN units, and the hidden width (--full), in multiples of N "
                        "(16 suits CPUs and tensor cores: odd GEMM widths can run far slower than a latency table "
                        "predicts; default: 1, any count)")
    p.add_argument("--latency-backend", default="cpp", choices=["torch", "triton", "cpp"],
                   help="backend the latency table is measured on")
    p.add_argument("--latency-table", default=None, metavar="JSON",
                   help="use this latency table (structprune latency-table) instead of the per-machine cache (default: "
                        "the cache, measured when missing)")
    p.add_argument("--latency-cache", default=None, metavar="DIR",
                   help="latency table cache directory (default: $STRUCTPRUNE_CACHE_DIR/latency or "
                        "~/.cache/structprune/latency)")
    p.add_argument("--refresh-latency", action="store_true", help="measure the latency table again")
    p.add_argument("--distill", action="store_true", help="distil from the unpruned model while training")
    p.add_argument("--teacher-logits", default=None, metavar="FILE",
                   help="with --distill: the teacher's logits on the train features, cached once in FILE (built "
                        "there when missing, reused by every student with the same data and settings), so the "
                        "students train without a teacher forward (default: the teacher runs beside the "
                        "student)")
    p.add_argument("--distill-alpha", type=float, default=0.5,
                   help="with --distill: weight of the distillation loss (1 - it: the loss on the gold answers)")
    p.add_argument("--temperature", type=float, default=2.0, help="with --distill: softmax temperature of the logits")
    p.add_argument("--distill-layers", nargs="?", const="auto", default=None, metavar="LAYERS",
                   help="with --distill: distil the hidden states layer by layer too (CoFi's layerwise distillation: "
                        "one learned linear map, each listed teacher layer matched to the closest student layer at "
                        "or above the previous match, every step); LAYERS: teacher layers from 0, e.g. 1,3,5 "
                        "(default 'auto': at most 4, every ceil(L/4)-th from the top: 1,3,5 of 6 layers, 2,5,8,11 "
                        "of 12)")
    p.add_argument("--layer-distill-weight", type=float, default=0.9,
                   help="with --distill-layers: weight of the layer loss, added to the distillation and task losses "
                        "(CoFi's 0.9)")
    p.add_argument("--gain-examples", type=int, default=256, help="questions used to estimate gain importance")
    p.add_argument("--gain-steps", type=int, default=1, help="iterative gain pruning steps")
    p.add_argument("--gate-lr", type=float, default=0.01, help="learning rate of the gates' log_alpha")
    p.add_argument("--lambda-lr", type=float, default=None,
                   help="learning rate of the Lagrange multipliers (default: --gate-lr); short runs need it "
                        "large, since Adam moves a multiplier by about its learning rate per step")
    p.add_argument("--full", action="store_true",
                   help="L0 only: also gate whole attention / FFN sublayers and the hidden dimensions (CoFi's "
                        "structures, BERT-layout models), under the same target; recorded as method l0-full")
    p.add_argument("--l0-warmup-steps", type=int, default=100, help="steps over which the L0 target is reached")
    p.add_argument("--l0-steps", type=int, default=0,
                   help="L0 only: a selection phase of this many gate-training steps, then the decision, then "
                        "--max-steps of continued training as for the other methods (0: gates and weights are "
                        "trained together for the whole run and the decision comes at its end)")
    p.add_argument("--l0-train-weights", action="store_true",
                   help="with --l0-steps: train the weights during the selection phase too (default: frozen); its "
                        "steps then count toward --epochs/--max-steps, so the continued training gets the rest")
    p.add_argument("--l0-until-target", action="store_true",
                   help="with --l0-steps: end the selection phase (and decide) as soon as, after --l0-warmup-steps, "
                        "the gates' expected kept counts (or latency) reach the target; --l0-steps is then the most "
                        "it may take. Without it the gates keep training to --l0-steps and may overshoot the target")
    p.add_argument("--eval-every", type=int, default=None,
                   help="evaluate on dev every N steps of the continued training (the curve goes to train/log.jsonl); "
                        "the model kept is the last one, as without it (default: evaluate only at the end)")
    p.add_argument("--l0-keep-dead", action="store_true",
                   help="L0 only: when the gates end below the target, keep the closed units ranked in (they compute "
                        "zeros) so that exactly the target count is kept (default: drop them; faster, same outputs)")
