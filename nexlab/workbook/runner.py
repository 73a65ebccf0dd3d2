"""Running the workbook: every notebook, in order, through papermill.

``nexlab workbook [--smoke] [--only NN ...] [-p NAME=VALUE ...]`` is what
``make workbook`` calls. Each notebook gets ``SMOKE``, ``SEED``, ``OUTPUT_DIR``
(``build/outputs/NN_name``) and ``ARTIFACTS_DIR`` (``build/artifacts``, shared by
the chapters) plus any ``-p`` values; the executed copy lands in
``build/executed/``. Smoke runs use ``build/smoke/`` instead of ``build/`` so a
quick check never overwrites the full artifacts. A failing notebook stops the run
and the error names the notebook, the cell and the exception.
"""

from __future__ import annotations

import ast
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat
import papermill as pm
from papermill.exceptions import PapermillExecutionError

from nexlab.core.errors import NexlabError, ToolError
from nexlab.core.progress import progress

REPO_ROOT = Path(__file__).resolve().parents[2]


NOTEBOOK_DIR = REPO_ROOT / "notebooks"


class NotebookFailed(ToolError):
    """A notebook raised: names the notebook, the failing cell (index in the source notebook,
    counting from 0, and its first line) and the exception."""

    def __init__(self, notebook: Path, cell_index: int | None, ename: str, evalue: str, executed: Path,
                 cell_source: str = ""):
        (self.notebook, self.cell_index, self.ename, self.evalue,
         self.executed) = notebook, cell_index, ename, evalue, executed
        where = f"cell {cell_index}" if cell_index is not None else "an unknown cell"
        first = next((ln for ln in cell_source.splitlines() if ln.strip()), "")
        if first:
            where += f" ({first.strip()[:80]!r})"
        super().__init__(f"{notebook.name} failed in {where}: {ename}: {evalue} (executed copy: {executed})")


def _source_cell(executed: Path, cell_index: int | None) -> tuple[int | None, str]:
    """Map a cell index of the executed copy (which has papermill's injected parameters cell)
    back to the source notebook's index, and return that cell's source."""
    if cell_index is None:
        return None, ""
    try:

        cells = [c for c in nbformat.read(str(executed), as_version=4).cells  # drop papermill's error banners
                 if "papermill-error-cell-tag" not in c.metadata.get("tags", [])]
        injected = sum("injected-parameters" in c.metadata.get("tags", []) for c in cells[:cell_index])
        return cell_index - injected, cells[cell_index].source
    except Exception:  # the executed copy is unreadable: report papermill's index as is
        return cell_index, ""


@dataclass
class WorkbookPaths:
    """Where a run puts its executed notebooks, per-notebook outputs and shared artifacts."""

    root: Path

    @property
    def executed(self) -> Path:
        return self.root / "executed"

    @property
    def outputs(self) -> Path:
        return self.root / "outputs"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @classmethod
    def default(cls, smoke: bool) -> "WorkbookPaths":
        base = REPO_ROOT / "build"
        return cls(base / "smoke" if smoke else base)


def list_notebooks(notebook_dir: Path = NOTEBOOK_DIR) -> list[Path]:
    """The chapters in run order (file order: ``NN_name.ipynb``)."""
    return sorted(p for p in notebook_dir.glob("[0-9][0-9]_*.ipynb"))


def select_notebooks(only: list[str] | None, notebook_dir: Path = NOTEBOOK_DIR) -> list[Path]:
    """Filter chapters by number prefix (``01``, ``1``) or stem; unknown names are an error."""
    books = list_notebooks(notebook_dir)
    if not only:
        return books
    chosen = []
    for key in only:
        matches = [b for b in books if b.stem == key or b.stem.split("_")[0] == key.zfill(2)]
        if not matches:
            raise NexlabError(f"--only {key!r}: no notebook matches (have: {', '.join(b.stem for b in books)})")
        chosen.extend(m for m in matches if m not in chosen)
    return sorted(chosen)


def parse_parameter(text: str) -> tuple[str, object]:
    """``NAME=VALUE`` -> (NAME, value); VALUE is a Python literal when it parses as one, else a string."""
    if "=" not in text:
        raise NexlabError(f"-p {text!r}: expected NAME=VALUE")
    name, raw = text.split("=", 1)
    name = name.strip()
    if not name.isidentifier():
        raise NexlabError(f"-p {text!r}: {name!r} is not a valid parameter name")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return name, value


def notebook_parameters(notebook: Path, paths: WorkbookPaths, smoke: bool, seed: int, extra: dict) -> dict:
    """The parameters one notebook receives (paths absolute, so the kernel's cwd does not matter)."""
    params = {
        "SMOKE": smoke,
        "SEED": seed,
        "OUTPUT_DIR": str(paths.outputs / notebook.stem),
        "ARTIFACTS_DIR": str(paths.artifacts),
    }
    params.update(extra)
    return params


def run_notebook(notebook: Path, executed: Path, parameters: dict, log_output: bool = False) -> float:
    """Execute one notebook with papermill (cwd = its folder); return seconds taken.

    Raises :class:`NotebookFailed` naming the failing cell.
    """

    executed.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        pm.execute_notebook(
            str(notebook), str(executed), parameters=parameters, cwd=str(notebook.parent),
            kernel_name="python3", progress_bar=False, log_output=log_output,
        )
    except PapermillExecutionError as exc:
        index, source = _source_cell(executed, exc.cell_index)
        raise NotebookFailed(notebook, index, exc.ename, exc.evalue, executed, source) from None
    return time.perf_counter() - start


def run_workbook(smoke: bool = False, only: list[str] | None = None, parameters: dict | None = None,
                 seed: int = 0, root: Path | None = None, log_output: bool = False) -> dict[str, float]:
    """Run the selected notebooks in order; return {notebook stem: seconds}. Stops at the first failure."""

    paths = WorkbookPaths(Path(root)) if root else WorkbookPaths.default(smoke)
    books = select_notebooks(only)
    if not books:
        raise NexlabError(f"no notebooks found in {NOTEBOOK_DIR}")
    times: dict[str, float] = {}
    bar = progress(books, desc="workbook", unit="notebook")
    for book in bar:
        bar.set_postfix_str(book.stem)
        params = notebook_parameters(book, paths, smoke, seed, parameters or {})
        times[book.stem] = run_notebook(book, paths.executed / book.name, params, log_output)
        print(f"  {book.stem}: {times[book.stem]:.1f} s -> {paths.outputs / book.stem}", flush=True)
    return times


def _cli(args) -> int:
    extra = dict(parse_parameter(p) for p in args.param or [])
    try:
        times = run_workbook(smoke=args.smoke, only=args.only, parameters=extra, seed=args.seed,
                             root=Path(args.build_dir) if args.build_dir else None, log_output=args.verbose)
    except NotebookFailed as exc:
        print(f"nexlab workbook: {exc}")
        return 1
    print(f"workbook done: {len(times)} notebooks in {sum(times.values()):.0f} s")
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("workbook", help="run the notebooks in order with papermill")
    p.add_argument("--smoke", action="store_true", help="smoke mode: tiny sizes, a minute or so per notebook")
    p.add_argument("--only", nargs="+", metavar="NN", help="run only these notebooks (number or stem)")
    p.add_argument("-p", "--param", action="append", metavar="NAME=VALUE", help="parameter for every notebook")
    p.add_argument("--seed", type=int, default=0, help="SEED passed to every notebook (default 0)")
    p.add_argument("--build-dir", help="root for executed/, outputs/, artifacts/ (default build/ or build/smoke/)")
    p.add_argument("-v", "--verbose", action="store_true", help="stream the notebooks' output")
    p.set_defaults(func=_cli)
