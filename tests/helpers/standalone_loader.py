"""Run by tests/model/test_standalone.py in a subprocess (``python -I``): loads saved models with plain
transformers while ``import structprune`` is made impossible, and saves their outputs.

    python -I standalone_loader.py JOBS.json

JOBS.json: ``{"inputs": "in.pt", "jobs": [[model_dir, auto_class, out.pt], ...]}``; a job may add a fourth entry,
``{"generate": N}``: greedy ``generate`` of N new tokens, saved as ``"generated"``.
"""
import importlib.abc
import json
import sys


class _BlockStructprune(importlib.abc.MetaPathFinder):
    """Refuses structprune (and its compiled extension), which the editable install would otherwise provide."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("structprune", "structprune_ops"):
            raise ModuleNotFoundError(f"{name} is blocked: this process must run without structprune")
        return None


sys.meta_path.insert(0, _BlockStructprune())

import torch  # noqa: E402
import transformers  # noqa: E402


def main(jobs_file):
    try:
        import structprune  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("structprune import was not blocked")
    torch.set_num_threads(1)
    spec = json.load(open(jobs_file))
    batch = torch.load(spec["inputs"])
    for model_dir, auto_class, out, *options in spec["jobs"]:
        options = options[0] if options else {}
        model = getattr(transformers, auto_class).from_pretrained(model_dir, trust_remote_code=True).eval()
        with torch.no_grad():
            o = model(**batch)
        result = {k: v for k, v in o.items() if isinstance(v, torch.Tensor)}
        if "generate" in options:
            with torch.no_grad():
                result["generated"] = model.generate(**batch, max_new_tokens=options["generate"], do_sample=False,
                                                     pad_token_id=model.config.pad_token_id)
        result["_class"] = type(model).__name__
        result["_structprune_modules"] = sorted(m for m in sys.modules if m.split(".")[0] == "structprune")
        torch.save(result, out)


if __name__ == "__main__":
    main(sys.argv[1])
