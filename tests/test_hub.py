"""GHNs and predicted weights through the real huggingface_hub client against a local fake Hub (tests/fake_hub.py).

Each test gets its own server, its own empty HF cache and HF_HUB_OFFLINE=0 for that server only.
"""

import hashlib
import json

import huggingface_hub
import pytest
import timm
import torch
from fake_hub import FakeHub
from huggingface_hub import ModelCard, constants, metadata_load
from safetensors.torch import load_file

import ghn_init
import ghn_init.hub
from ghn_init.cards import ghn_card, predicted_card
from ghn_init.cli import main

REPO = "org/tiny-ghn"
DATA = {"dataset": "cifar10", "input_size": [3, 32, 32], "mean": [0.4914, 0.4822, 0.4465],
        "std": [0.247, 0.2435, 0.2616], "num_classes": 10}
GHN_FILES = ("config.json", "model.safetensors", "README.md")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A running FakeHub that huggingface_hub talks to, with a fresh cache and no token of the user's."""
    home = tmp_path / "hf-home"
    with FakeHub() as server:
        settings = {
            "ENDPOINT": server.endpoint,
            "HUGGINGFACE_CO_URL_TEMPLATE": server.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
            "HF_HUB_OFFLINE": False,
            "HF_HOME": str(home),
            "HF_HUB_CACHE": str(home / "hub"),
            "HF_XET_CACHE": str(home / "xet"),
            "HF_TOKEN_PATH": str(home / "token"),
            "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
            "HF_HUB_DISABLE_TELEMETRY": True,  # no agent-detection request to the endpoint
        }
        for name, value in settings.items():  # huggingface_hub read these from the environment at import
            monkeypatch.setattr(constants, name, value)
        for name, value in {"HF_ENDPOINT": server.endpoint, "HF_HUB_OFFLINE": "0", "HF_HOME": str(home),
                            "HF_HUB_CACHE": str(home / "hub"), "HF_HUB_DISABLE_TELEMETRY": "1"}.items():
            monkeypatch.setenv(name, value)
        for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setattr(ghn_init.hub, "HUB_RETRY_WAIT_S", 0.01)
        yield server
        huggingface_hub.close_session()  # drop keep-alive connections to this server
    assert server.unhandled == [], "the client called endpoints the fake Hub does not serve"


def go_offline(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def tiny_ghn(seed: int = 0) -> ghn_init.GHN:
    torch.manual_seed(seed)
    ghn = ghn_init.GHN(ghn_init.GHNConfig(hidden=16, rounds=1, latent=8, block=8, block_1x1=8, vector=8))
    ghn.meta = {"name": f"tiny-ghn-{seed}", "data": dict(DATA)}
    return ghn


def put_ghn(hub: FakeHub, tmp_path, ghn: ghn_init.GHN, repo: str = REPO, files=GHN_FILES) -> str:
    """Commit ``ghn`` (only ``files`` of its folder) to the fake Hub; returns the commit sha."""
    folder = ghn_init.hub.save_pretrained(ghn, tmp_path / f"ghn-{len(hub.requests)}-{ghn.meta['name']}",
                                          model_card=ghn_card(ghn))
    return hub.commit(repo, {name: (folder / name).read_bytes() for name in files})


def same_tensors(a: ghn_init.GHN, b: ghn_init.GHN) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def resolve_path(repo: str, sha: str, name: str) -> str:
    return f"/{repo}/resolve/{sha}/{name}"


def test_load_downloads_a_ghn_from_the_hub(hub, tmp_path):
    ghn = tiny_ghn()
    sha = put_ghn(hub, tmp_path, ghn)
    loaded = ghn_init.load(REPO)
    assert same_tensors(loaded, ghn) and loaded.meta["name"] == "tiny-ghn-0"
    assert hub.count("GET", resolve_path(REPO, sha, "model.safetensors")) == 1
    assert (tmp_path / "hf-home" / "hub" / "models--org--tiny-ghn" / "snapshots" / sha / "model.safetensors").is_file()


def test_second_load_comes_from_the_cache_online_and_offline(hub, tmp_path, monkeypatch):
    sha = put_ghn(hub, tmp_path, tiny_ghn())
    first = ghn_init.load(REPO)
    before = len(hub.requests)
    again = ghn_init.load(REPO)
    downloads = [r for r in hub.requests[before:] if "/resolve/" in r.path]
    assert downloads == [] and same_tensors(first, again)
    go_offline(monkeypatch)
    before = len(hub.requests)
    assert same_tensors(ghn_init.load(REPO), first)
    assert same_tensors(ghn_init.load(REPO, revision=sha), first)
    assert len(hub.requests) == before


def test_revision_pins_a_commit(hub, tmp_path):
    old, new = tiny_ghn(0), tiny_ghn(1)
    old_sha = put_ghn(hub, tmp_path, old)
    put_ghn(hub, tmp_path, new)
    assert same_tensors(ghn_init.load(REPO, revision=old_sha), old)
    assert same_tensors(ghn_init.load(REPO), new)
    assert not same_tensors(old, new)


def test_missing_repo_names_it_and_is_not_retried(hub):
    with pytest.raises(ghn_init.GHNNotFoundError) as err:
        ghn_init.load("org/nope")
    message = str(err.value)
    assert "Hub repo org/nope@main" in message and "does not exist" in message and "hf auth login" in message
    assert hub.count("GET", "/api/models/org/nope/revision/main") == 1


def test_missing_weights_name_the_file_and_what_to_do(hub, tmp_path):
    sha = put_ghn(hub, tmp_path, tiny_ghn(), files=("config.json", "README.md"))
    with pytest.raises(ghn_init.GHNNotFoundError) as err:
        ghn_init.load(REPO)
    message = str(err.value)
    assert f"Hub repo {REPO}@main" in message and "no model.safetensors" in message and sha in message
    assert "push_to_hub" in message


def test_unknown_revision_and_offline_without_cache(hub, tmp_path, monkeypatch):
    put_ghn(hub, tmp_path, tiny_ghn())
    with pytest.raises(ghn_init.GHNNotFoundError, match=r"org/tiny-ghn@v9: no branch, tag or commit 'v9'"):
        ghn_init.load(REPO, revision="v9")
    go_offline(monkeypatch)
    before = len(hub.requests)
    with pytest.raises(ghn_init.GHNNotFoundError, match="HF_HUB_OFFLINE=1 forbids downloading"):
        ghn_init.load(REPO)
    assert len(hub.requests) == before


def test_transient_5xx_is_retried(hub, tmp_path):
    # huggingface_hub 2.4 retries neither the revision lookup nor a file GET on 5xx: ghn_init.load does.
    ghn = tiny_ghn()
    sha = put_ghn(hub, tmp_path, ghn)
    weights = resolve_path(REPO, sha, "model.safetensors")
    hub.fail_next(f"/api/models/{REPO}/revision/main", times=1, status=503)
    hub.fail_next(weights, times=1, status=502, method="GET")
    assert same_tensors(ghn_init.load(REPO), ghn)
    assert hub.count("GET", f"/api/models/{REPO}/revision/main") == 3
    assert hub.count("GET", weights) == 2


def test_persistent_5xx_gives_up_with_advice(hub, tmp_path):
    put_ghn(hub, tmp_path, tiny_ghn())
    hub.fail_next(f"/api/models/{REPO}/revision/main", times=10, status=503)
    with pytest.raises(ghn_init.GHNNotFoundError, match="did not answer after 3 attempts.*try again later"):
        ghn_init.load(REPO)
    assert hub.count("GET", f"/api/models/{REPO}/revision/main") == ghn_init.hub.HUB_ATTEMPTS


@pytest.mark.parametrize("hf_xet", [True, False], ids=["pipelined-upload", "create-commit"])
def test_push_to_hub_then_load_gives_identical_tensors(hub, monkeypatch, hf_xet):
    # upload_folder streams commits when hf_xet is installed and makes one create_commit otherwise
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", not hf_xet)
    ghn = tiny_ghn(3)
    url = ghn_init.hub.push_to_hub(ghn, "org/pushed", private=True, token="hf_test")
    sha = url.rsplit("/", 1)[-1]
    assert url == f"{hub.endpoint}/org/pushed/commit/{sha}" and hub.repos["org/pushed"].private
    assert {"config.json", "model.safetensors", "README.md"} <= set(hub.files("org/pushed", sha))
    commits = [r for r in hub.requests if r.path == "/api/models/org/pushed/commit/main"]
    assert commits and all(r.authorization == "Bearer hf_test" for r in commits)
    loaded = ghn_init.load("org/pushed", revision=sha)
    assert same_tensors(loaded, ghn) and loaded.meta == ghn.meta
    card = hub.files("org/pushed")["README.md"].decode()
    assert ModelCard(card).data.library_name == "ghn-init" and 'ghn_init.load("org/pushed")' in card


def test_push_to_a_branch_leaves_main_alone(hub):
    ghn = tiny_ghn(4)
    ghn_init.hub.push_to_hub(ghn, "org/branchy", revision="dev")
    assert same_tensors(ghn_init.load("org/branchy", revision="dev"), ghn)
    assert "model.safetensors" not in hub.files("org/branchy", "main")


def test_push_without_write_access_says_how_to_log_in(hub):
    hub.fail_next("/api/repos/create", status=403)
    with pytest.raises(RuntimeError, match=r"org/theirs.*hf auth login"):
        ghn_init.hub.push_to_hub(tiny_ghn(), "org/theirs")


def test_cli_predict_push_to_hub_loads_in_plain_timm(hub, tmp_path):
    ghn_folder = ghn_init.hub.save_pretrained(tiny_ghn(5), tmp_path / "ghn")
    out = tmp_path / "r18"
    assert main(["predict", "resnet18", "--num-classes", "10", "--ghn", str(ghn_folder), "--out", str(out),
                 "--push-to-hub", "org/resnet18-ghn", "--private"]) == 0
    remote = hub.files("org/resnet18-ghn")
    assert hub.repos["org/resnet18-ghn"].private
    for name in ("config.json", "model.safetensors", "README.md"):
        assert remote[name] == (out / name).read_bytes(), name
    model = timm.create_model("hf-hub:org/resnet18-ghn", pretrained=True)
    saved = load_file(out / "model.safetensors")
    state = model.state_dict()
    assert state.keys() == saved.keys() and all(torch.equal(saved[k], state[k]) for k in saved)
    assert model.num_classes == 10


def test_cli_private_needs_push_to_hub(tmp_path):
    with pytest.raises(SystemExit):
        main(["predict", "resnet18", "--out", str(tmp_path / "o"), "--private"])
    assert not (tmp_path / "o").exists()


def test_ghn_card_metadata_carries_evaluation(tmp_path):
    ghn = tiny_ghn()
    evaluation = {"setup": {"split": "test (10,000)"}, "architectures": {
        "resnet18": {"kwargs": {}, "ghn": {"acc_bn_calibrated": 0.3668, "acc_batch_stats": 0.3739}},
        "vit_tiny_patch16_224": {"kwargs": {"img_size": 32}, "ghn": {"acc_bn_calibrated": 0.26}}}}
    ghn.meta["evaluation"] = [evaluation]
    folder = ghn_init.hub.save_pretrained(ghn, tmp_path / "ghn", model_card=ghn_card(ghn, repo_id=REPO))
    meta = metadata_load(folder / "README.md")
    assert meta["library_name"] == "ghn-init" and meta["license"] == "apache-2.0"
    assert meta["datasets"] == ["cifar10"] and "graph-hypernetwork" in meta["tags"]
    assert "pipeline_tag" not in meta  # a GHN is not an image classifier
    results = ModelCard.load(folder / "README.md").data.eval_results
    assert [(r.dataset_type, r.dataset_split, r.metric_type, r.metric_value) for r in results] == [
        ("cifar10", "test (10,000)", "accuracy", 0.3668), ("cifar10", "test (10,000)", "accuracy", 0.3739),
        ("cifar10", "test (10,000)", "accuracy", 0.26)]
    assert results[2].metric_name.startswith('vit_tiny_patch16_224 {"img_size": 32}')
    assert f'ghn_init.load("{REPO}")' in (folder / "README.md").read_text()
    assert ghn_init.load(str(folder)).meta["evaluation"] == [evaluation]


def test_untrained_ghn_card_says_so():
    card = ghn_card(tiny_ghn())
    assert "No meta-training is recorded" in card and "None steps" not in card
    assert "model-index" not in ModelCard(card).data.to_dict()


def test_predicted_card_metadata():
    card = ModelCard(predicted_card("resnet18", {"img_size": 32}, "tiny-ghn", "ab" * 32, 10, DATA))
    meta = card.data.to_dict()
    assert meta["library_name"] == "timm" and meta["license"] == "apache-2.0"
    assert meta["datasets"] == ["cifar10"] and meta["pipeline_tag"] == "image-classification"
    assert {"timm", "ghn-init", "predicted-weights", "timm:resnet18"} <= set(meta["tags"])
    assert meta["ghn_init"] == {"architecture": "resnet18", "model_args": {"img_size": 32}, "num_classes": 10,
                                "ghn": "tiny-ghn", "ghn_sha256": "ab" * 32, "bn_calibration": "identity"}
    assert "base_model" not in meta and "base_model_relation" not in meta
    assert 'timm.create_model("hf-hub:' in card.text
    json.dumps(meta)  # plain data: what the Hub stores


@pytest.mark.fixtures
def test_published_ghn_file_downloads_once_then_loads_offline(hub, monkeypatch, reference_fixtures):
    """``ghn_init.load("ghn3-t")``: the Hub file through the real client and cache, retried on a 5xx."""
    repo = "SamsungSAILMontreal/ghn3"
    data = (reference_fixtures / "ghn3-tm8-random.joblib").read_bytes()
    hub.commit(repo, {"ghn3tm8.pt": data})
    file = resolve_path(repo, "main", "ghn3tm8.pt")
    hub.fail_next(file, times=1, status=503, method="GET")
    online = ghn_init.load("ghn3-t")
    assert hub.count("GET", file) == 2
    assert online.meta["source"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert online.meta["source"]["repo_id"] == repo and online.meta["title"] == "GHN-3-T/m8"
    go_offline(monkeypatch)
    requests = len(hub.requests)
    offline = ghn_init.load("SamsungSAILMontreal/ghn3", filename="ghn3tm8.pt")
    assert len(hub.requests) == requests
    assert ghn_init.content_hash(offline) == ghn_init.content_hash(online)
