"""The AI-agent interaction function, loaded and driven by cvat-cli's own agent worker code (in-process),
against a live labelserve process. cvat-sdk/cvat-cli are pinned: these are private APIs."""

from __future__ import annotations

from pathlib import Path

import attrs
import httpx
import PIL.Image
import pytest
from cvat_cli._internal import agent_driver, agent_driver_interaction
from cvat_cli._internal.common import FunctionLoader

from .conftest import synthetic_scene

MODULE = Path(__file__).parents[1] / "server" / "cvat" / "agent_functions.py"


@pytest.fixture(scope="module")
def function(live_server: str):
    loaded = FunctionLoader(
        function_module=None,
        function_file=MODULE,
        function_parameters={"url": live_server, "model": "mobile_sam"},
    ).load()
    agent_driver.set_worker_current_function(loaded)
    agent_driver_interaction.AgentInteractionFunctionDriver.init_worker(None)
    return loaded


def embeddings_misses(url: str) -> int:
    return httpx.get(f"{url}/v1/cache/stats").json()["embeddings"]["misses"]


def test_spec_maps_to_cvat_remote_fields(function) -> None:
    fields = agent_driver_interaction.AgentInteractionFunctionDriver.get_remote_function_fields(function.spec)
    assert fields == {"min_pos_points": 0, "min_neg_points": 0, "startswith_box_optional": True}


def test_interact_then_clicks_from_the_agent_cache(function, live_server: str) -> None:
    image = PIL.Image.fromarray(synthetic_scene(320, 240, seed=77))
    prompts = agent_driver_interaction._InteractionPromptsImpl(
        pos_points=((100.0, 120.0),), neg_points=(), bounding_box=None
    )
    key = (1, 0, ())
    before = embeddings_misses(live_server)
    shapes = agent_driver_interaction._worker_job_interact(key, image, prompts)
    assert embeddings_misses(live_server) == before + 1
    body = {"shapes": [attrs.asdict(shape) for shape in shapes]}  # what the agent posts to /complete
    (shape,) = body["shapes"]
    *runs, xtl, ytl, xbr, ybr = shape["points"]
    assert shape["type"] == "mask" and sum(runs) == (xbr - xtl + 1) * (ybr - ytl + 1)
    assert shape["attributes"][0].spec_id == 0 and 0 <= float(shape["attributes"][0].value) <= 1
    more = agent_driver_interaction._InteractionPromptsImpl(
        pos_points=((100.0, 120.0),), neg_points=((10.0, 10.0),), bounding_box=((50.0, 60.0), (250.0, 200.0))
    )
    again = agent_driver_interaction._worker_job_interact_from_cache(key, more)
    assert again and again[0].type == "mask"
    assert embeddings_misses(live_server) == before + 1  # the frame was not sent again


def test_evicted_embedding_is_sent_again(function, live_server: str) -> None:
    image = PIL.Image.fromarray(synthetic_scene(200, 150, seed=78))
    prompts = agent_driver_interaction._InteractionPromptsImpl(
        pos_points=((50.0, 50.0),), neg_points=(), bounding_box=None
    )
    agent_driver_interaction._worker_job_interact((2, 0, ()), image, prompts)
    httpx.delete(f"{live_server}/v1/cache")
    shapes = agent_driver_interaction._worker_job_interact_from_cache((2, 0, ()), prompts)
    assert shapes and shapes[0].type == "mask"


def test_server_errors_reach_cvat_as_messages(function) -> None:
    image = PIL.Image.fromarray(synthetic_scene(64, 48, seed=79))
    outside = agent_driver_interaction._InteractionPromptsImpl(
        pos_points=((500.0, 5.0),), neg_points=(), bounding_box=None
    )
    with pytest.raises(Exception, match="outside"):
        agent_driver_interaction._worker_job_interact((3, 0, ()), image, outside)
