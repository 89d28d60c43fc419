"""ExPLAIND Studio dashboard: ``streamlit run app/main.py [-- --runs DIR]``.

Routes to one page per view (``st.navigation``) and holds the sidebar: the runs
directory, the run selector, presentation mode and the figure image format.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `streamlit run app/main.py` puts only app/ on the path
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402
from streamlit.delta_generator import DeltaGenerator  # noqa: E402

from app import state  # noqa: E402
from app.charts import Style  # noqa: E402
from engine.errors import ExplaindError  # noqa: E402

OVERVIEW = "views/overview.py"
PAGES = [
    st.Page(OVERVIEW, title="Overview", icon=":material/monitoring:", url_path="home", default=True),
    st.Page("views/components.py", title="Components", icon=":material/grid_on:", url_path="components"),
    st.Page("views/data.py", title="Data", icon=":material/dataset:", url_path="data"),
    st.Page("views/reconstruction.py", title="Reconstruction", icon=":material/rule:", url_path="reconstruction"),
    st.Page("views/pruning.py", title="Pruning", icon=":material/content_cut:", url_path="pruning"),
    st.Page("views/compare.py", title="Compare", icon=":material/compare:", url_path="compare"),
    # the default page is served at "/"; this hidden twin makes its own path /overview resolve too
    st.Page(OVERVIEW, title="Overview", url_path="overview", visibility="hidden"),
]

# Always: long unbroken values (hashes, paths) wrap inside table cells instead of overflowing.
BASE_CSS = """
<style>
[data-testid="stTable"] td, [data-testid="stTable"] th { overflow-wrap: anywhere; }
</style>
"""

# Presentation mode: every text scaled up by one factor, metric values above their labels,
# nothing cut off (labels wrap, segmented controls keep whole words), no hint icons.
PRESENTATION_CSS = """
<style>
html { font-size: 22px !important; }
.stApp, [data-testid="stAppViewContainer"], [data-testid="stHeader"] { background: #ffffff; color: #111111; }
.stApp p, .stApp label, .stApp li, .stApp input, .stApp button, .stApp textarea,
.stApp [data-baseweb="select"] div, .stApp [data-testid="stTable"] th, .stApp [data-testid="stTable"] td,
.stApp [data-testid="stSliderThumbValue"], .stApp [data-testid="stSliderTickBarMin"],
.stApp [data-testid="stSliderTickBarMax"], .stApp [data-testid="stExpander"] summary {
  font-size: 1.1rem !important; line-height: 1.4 !important; }
.stApp h1 { font-size: 2.4rem !important; } .stApp h2 { font-size: 2.0rem !important; }
.stApp h3 { font-size: 1.6rem !important; }
.stApp [data-testid="stMetricLabel"] p { font-size: 1.1rem !important; }
.stApp [data-testid="stMetricValue"], .stApp [data-testid="stMetricValue"] p {
  font-size: 2.6rem !important; line-height: 1.25 !important; }
.stApp [data-testid="stCaptionContainer"] p { font-size: 1.0rem !important; }
.stApp .stMarkdownEllipsis, .stApp .stMarkdownEllipsis p { white-space: normal !important; overflow: visible !important;
  text-overflow: clip !important; }
.stApp [data-testid="stButtonGroup"] > div { flex-wrap: wrap; }
.stApp [data-testid="stButtonGroup"] button { flex: 0 0 auto !important; min-width: max-content !important;
  white-space: nowrap !important; }
[data-testid="stTooltipIcon"], [data-testid="stToolbar"], [data-testid="stDecoration"] { display: none !important; }
.block-container { padding-top: 3rem; max-width: 100%; }
</style>
"""

NO_RUNS = """
No run databases (`*.duckdb`) were found in `{directory}`.

Produce one with the engine, for example

    python -m engine explain RUN_DIR --out {directory}/my-run.duckdb --views components,data,importance

or point the dashboard at a directory that has some: type it in the sidebar, start with
`streamlit run app/main.py -- --runs DIR`, or set the environment variable `EXPLAIND_RUNS`.
"""


FIRST_RUN = "grokking"  # the run a link without ?run= opens, when the directory has it


def choose_directory() -> Path:
    """The runs directory: the sidebar's text (``dir=``) if it names a directory under the
    allowed roots (``state.allowed_roots``), else the launch default."""
    launch = state.default_runs_dir()
    typed = state.url_widget(
        "dir", state.text(), "",
        lambda key: st.text_input(
            "Runs directory", key=key, placeholder=str(launch),
            help="A directory with run databases (*.duckdb). Empty: the directory the app was started with.",
        ),
    )  # fmt: skip
    if not typed.strip():
        return launch
    try:
        return state.check_directory(typed, state.allowed_roots())
    except ValueError as exc:
        state.warn_param("dir", typed, str(exc), str(launch))
        state.publish("dir", "")  # a link copied from this view does not carry the refused directory
        return launch


def sidebar() -> tuple[state.Run | None, Path, DeltaGenerator]:
    """Draw the sidebar controls; return the chosen run (``None`` if there is none), its directory
    and an empty sidebar box for what the page adds (the slide export)."""
    with st.sidebar:
        directory = choose_directory()
        choices = [state.Run.at(p) for p in state.find_runs(directory)]
        names = [c.name for c in choices]
        state.set_run_choices(choices)
        run = None
        if names:
            name = state.url_widget(
                "run", state.choice(names), FIRST_RUN if FIRST_RUN in names else names[0],
                lambda key: st.selectbox("Run", names, key=key, help=f"Run databases in {directory}"),
            )  # fmt: skip
            run = choices[names.index(name)]
        presentation = state.url_widget(
            "present", state.flag(), False,
            lambda key: st.toggle("Presentation mode", key=key, help="Large fonts, light charts, no hints."),
        )  # fmt: skip
        image_format = state.url_widget(
            "img", state.choice(["png", "svg"]), "png",
            lambda key: st.segmented_control(
                "Toolbar image format", ["png", "svg"], required=True, key=key,
                help="Format of the camera button in each chart's toolbar.",
            ),
        )  # fmt: skip
        page_box = st.container()
    dark = st.context.theme.type == "dark"
    state.set_style(Style(presentation=presentation, dark=dark), image_format)
    st.html(BASE_CSS + (PRESENTATION_CSS if presentation else ""))
    # switching presentation on (in the app or by a link) folds the sidebar away; off unfolds it
    st.set_page_config(initial_sidebar_state="collapsed" if presentation else "auto")
    return run, directory, page_box


def opens_presenting() -> bool:
    """Whether the link asks for presentation mode (then the sidebar starts collapsed)."""
    try:
        return state.flag().parse(st.query_params.get("present", "0"))
    except ValueError:
        return False


def main() -> None:
    state.freeze_startup_heap()
    st.set_page_config(
        page_title="ExPLAIND Studio", page_icon=":material/insights:", layout="wide",
        initial_sidebar_state="collapsed" if opens_presenting() else "auto",
    )  # fmt: skip
    page = st.navigation(PAGES)
    state.begin_url_run(page.url_path)
    run, directory, page_box = sidebar()
    state.set_current_run(run)
    if run is None:
        st.title("ExPLAIND Studio")
        st.info(NO_RUNS.format(directory=directory), icon="ℹ️")
    else:
        try:
            with st.spinner(f"Opening {state.escaped(run.name)}…"):
                run.open()
            page.run()
            with page_box, st.expander("Export slides", icon=":material/slideshow:"):
                state.slides_panel(run)
        except ExplaindError as exc:
            st.error(f"Cannot show run {state.escaped(run.name)}: {exc}", icon="🚫")
    state.finish_url_run()


main()
