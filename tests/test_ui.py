"""`mlflow ui` as a new user meets it (#17), in a real Chromium (tests/ui_browser.py): after
`seqgen demo` on a smoke store, the link it prints opens the default strategies' chains in
model-training mode, the chart view draws `val_mae` as one line per chain over the global epochs,
and the registry lists the models with their aliases."""

import pytest
import ui_browser
from conftest import subprocess_env
from services import require

from seqgen.config import N_PHASES, default_strategies, resolve

pytestmark = pytest.mark.slow

CHAINS = [f"{s}-s0" for s in default_strategies()]  # what the demo trains


@pytest.fixture(scope="module")
def demo(tmp_path_factory, smoke_data):
    """A smoke demo's store, the link the demo printed, and the folder; yields (uri, link,
    folder)."""
    require(ui_browser.chromium_missing())
    folder = tmp_path_factory.mktemp("ui-demo")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    link = ui_browser.run_demo(folder, smoke_data, "smoke", subprocess_env(uri))
    return uri, link, folder


@pytest.fixture(scope="module")
def page(demo):
    uri, _, folder = demo
    with ui_browser.ui(uri, folder) as (page, address):
        yield page, address


def test_the_printed_link_opens_every_strategy_s_chain_in_model_training_mode(demo, page):
    _, link, _ = demo
    page, address = page
    assert "workflowType=machine_learning" in link
    ui_browser.open_runs(page, ui_browser.on_port(link, address), CHAINS)
    assert page.get_by_text("3 matching runs").is_visible()  # the chains, nothing else
    page.get_by_text("Model metrics").first.wait_for()
    # GenAI mode would show its own sidebar (Observability, Evaluation, Prompts...)
    assert page.get_by_text("Observability").count() == 0


def test_the_chart_view_draws_val_mae_once_per_chain_over_the_global_epochs(demo, page):
    _, link, _ = demo
    page, address = page
    ui_browser.open_runs(page, ui_browser.on_port(link, address), CHAINS)
    drawn = ui_browser.drawn_lines(ui_browser.chart(page, "val_mae"))
    epochs = resolve("mae", 1, "smoke").epochs * N_PHASES
    # five phases stitched: one continuous line per chain, every global epoch once
    assert drawn == {chain: list(range(1, epochs + 1)) for chain in CHAINS}


def test_the_registry_lists_the_models_with_their_aliases(page):
    page, address = page
    page.goto(f"{address}/#/models")
    for strategy in default_strategies():
        name = f"seqgen-{strategy}-smoke"
        page.get_by_role("link", name=name, exact=True).wait_for()
        row = page.get_by_role("row").filter(has_text=name)
        assert f"phase-{N_PHASES}-s0" in row.inner_text()
    # the model's page (a dialog about the new registry UI covers the list: go there directly)
    page.goto(f"{address}/#/models/seqgen-mae-smoke")
    page.get_by_text(f"phase-{N_PHASES}-s0").first.wait_for()
    versions = page.inner_text("body")
    for phase in range(1, N_PHASES + 1):
        assert f"phase-{phase}-s0" in versions, phase
    assert "models:/seqgen-mae-smoke@phase-5" in versions  # its description: how to load it
