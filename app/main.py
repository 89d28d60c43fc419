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

from app import state  # noqa: E402
from app.charts import Style  # noqa: E402
from engine.errors import ExplaindError  # noqa: E402

PAGES = [
    st.Page("views/overview.py", title="Overview", icon=":material/monitoring:", url_path="overview", default=True),
    st.Page("views/components.py", title="Components", icon=":material/grid_on:", url_path="components"),
    st.Page("views/data.py", title="Data", icon=":material/dataset:", url_path="data"),
    st.Page("views/reconstruction.py", title="Reconstruction", icon=":material/rule:", url_path="reconstruction"),
    st.Page("views/pruning.py", title="Pruning", icon=":material/content_cut:", url_path="pruning"),
    st.Page("views/compare.py", title="Compare", icon=":material/compare:", url_path="compare"),
]

PRESENTATION_CSS = """
<style>
html { font-size: 20px !important; }
.stApp, [data-testid="stAppViewContainer"], [data-testid="stHeader"] { background: #ffffff; color: #111111; }
.stApp p, .stApp label, .stApp li, .stApp input, .stApp button { font-size: 1.1rem !important; }
.stApp h1 { font-size: 2.6rem !important; } .stApp h2 { font-size: 2.1rem !important; }
.stApp h3 { font-size: 1.7rem !important; }
[data-testid="stMetricValue"] { font-size: 2.8rem !important; }
[data-testid="stCaptionContainer"], [data-testid="stTooltipIcon"], [data-testid="stToolbar"],
[data-testid="stDecoration"] { display: none !important; }
.block-container { padding-top: 4rem; max-width: 100%; }
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
    """The runs directory: the sidebar's text if it names a directory, else the launch default."""
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
    directory = Path(typed.strip()).expanduser()
    if not directory.is_dir():
        st.warning(f"`{directory}` is not a directory; showing runs from `{launch}`.", icon="⚠️")
        return launch
    return directory


def sidebar() -> tuple[state.Run | None, Path]:
    """Draw the sidebar controls; return the chosen run (``None`` if there is none) and its directory."""
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
    dark = st.context.theme.type == "dark"
    state.set_style(Style(presentation=presentation, dark=dark), image_format)
    if presentation:
        st.html(PRESENTATION_CSS)
    return run, directory


def opens_presenting() -> bool:
    """Whether the link asks for presentation mode (then the sidebar starts collapsed)."""
    try:
        return state.flag().parse(st.query_params.get("present", "0"))
    except ValueError:
        return False


def main() -> None:
    st.set_page_config(
        page_title="ExPLAIND Studio", page_icon=":material/insights:", layout="wide",
        initial_sidebar_state="collapsed" if opens_presenting() else "auto",
    )  # fmt: skip
    page = st.navigation(PAGES)
    state.begin_url_run(page.url_path)
    run, directory = sidebar()
    state.set_current_run(run)
    if run is None:
        st.title("ExPLAIND Studio")
        st.info(NO_RUNS.format(directory=directory), icon="ℹ️")
    else:
        try:
            with st.spinner(f"Opening {run.name}…"):
                run.open()
            page.run()
        except ExplaindError as exc:
            st.error(f"Cannot show run `{run.name}`: {exc}", icon="🚫")
    state.finish_url_run()


main()
