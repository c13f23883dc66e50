"""Person re-identification as a task of the library: a tiny Market-1501 folder written here, a K = 2
grafted population trained on its identities and evaluated on its query and gallery through the
Trainer's own loop, the student exported and evaluated again by `hf-graft evaluate --task reid`; the
features population (loop and fused), `ReidMetrics`, the config's refusals, the non-square transforms,
and the Table 7 recipes built offline."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

import hf_graft  # noqa: F401  (registers cifar_resnet20)
from hf_graft.config import ConfigError, DataArguments, GraftingConfig

ROOT = Path(__file__).resolve().parents[1]
HEIGHT, WIDTH = 32, 16
TRAIN_IDS = range(1, 9)  # 8 training identities over 3 cameras
TEST_IDS = range(101, 107)  # query identities, each with gallery images under cameras 2 and 3
UNMATCHED_ID = 107  # its only gallery image is under the query's camera: the query is skipped


def _person(identity: int, camera: int, rng: np.random.Generator) -> PILImage.Image:
    """Four horizontal bands whose colours depend on the identity, a camera's brightness, and noise."""
    palette = np.random.default_rng(identity).integers(0, 256, size=(4, 3)).astype(np.float32)
    pixels = np.repeat(palette, HEIGHT // 4, axis=0)[:, None, :].repeat(WIDTH, axis=1)
    pixels += 15.0 * camera + rng.normal(0.0, 12.0, size=pixels.shape)
    return PILImage.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_market(root: Path) -> Path:
    """A Market-1501 folder: junk (-1) and distractors (0) in the gallery, one query without a match."""
    rng = np.random.default_rng(0)
    count = 0

    def save(folder: str, identity: int, camera: int) -> None:
        nonlocal count
        count += 1
        (root / folder).mkdir(parents=True, exist_ok=True)
        name = f"{identity:04d}" if identity >= 0 else "-1"
        _person(identity if identity > 0 else 500 + count, camera, rng).save(
            root / folder / f"{name}_c{camera}s1_{count:06d}_01.png")

    for identity in TRAIN_IDS:
        for camera in (1, 2, 3):
            for _ in range(2):
                save("bounding_box_train", identity, camera)
    for identity in TEST_IDS:
        save("query", identity, 1)
        for camera in (1, 2, 3):  # the camera-1 image is left out for the camera-1 query
            save("bounding_box_test", identity, camera)
    save("query", UNMATCHED_ID, 1)
    save("bounding_box_test", UNMATCHED_ID, 1)
    save("bounding_box_test", 0, 1)
    save("bounding_box_test", 0, 2)
    save("bounding_box_test", -1, 2)
    return root


def reference_metrics(query, gallery, q_ids, g_ids, q_cams, g_cams) -> dict[str, float]:
    """mAP and rank-1 one query at a time (NumPy, float64): squared Euclidean distance, a stable sort,
    the query's identity under its own camera left out, queries without a match skipped."""
    aps, firsts = [], []
    for q in range(len(query)):
        dist = ((gallery.astype(np.float64) - query[q].astype(np.float64)) ** 2).sum(1)
        order = np.argsort(dist, kind="stable")
        keep = ~((g_ids[order] == q_ids[q]) & (g_cams[order] == q_cams[q]))
        match = (g_ids[order] == q_ids[q])[keep]
        if not match.any():
            continue
        ranks = np.flatnonzero(match) + 1
        aps.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
        firsts.append(ranks[0])
    return {"mAP": 100.0 * float(np.mean(aps)), "rank1": 100.0 * float(np.mean(np.asarray(firsts) <= 1)),
            "valid_queries": len(aps)}


# ----------------------------------------------------------------------------- one run, shared
@pytest.fixture(scope="module")
def market(tmp_path_factory) -> Path:
    return write_market(tmp_path_factory.mktemp("reid") / "Market-1501")


@pytest.fixture(scope="module")
def reid_run(market, tmp_path_factory):
    """K = 2 grafted cifar_resnet20 members, 2 epochs on the folder's identities, evaluated every epoch."""
    from hf_graft.training.builder import build_run
    from hf_graft.training.trainer import GraftingTrainer

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("reid_run") / "run"
    data_args = DataArguments(task="reid", dataset_name="market1501", data_dir=str(market), input_height=HEIGHT,
                              input_width=WIDTH, train_augmentation="pad_crop", crop_padding=2, random_erasing=0.5)
    config = GraftingConfig(output_dir=str(out), student_model="cifar_resnet20", num_students=2, num_train_epochs=2,
                            per_device_train_batch_size=16, per_device_eval_batch_size=8, learning_rate=0.05,
                            lr_spread=["cosine"], use_cpu=True, dataloader_num_workers=0, save_strategy="epoch",
                            logging_steps=1, report_to="none", seed=3)
    parts = build_run(config, data_args)
    trainer = GraftingTrainer(args=config, **parts.trainer_kwargs())
    trainer.train()
    torch.set_num_threads(previous)
    return trainer, data_args


def test_the_run_trains_on_identities_and_logs_reid_metrics_every_evaluation(reid_run):
    trainer, _ = reid_run
    spec = trainer.population.spec
    assert spec.task == "reid" and spec.num_classes == 8 and spec.label_names == [str(i) for i in TRAIN_IDS]
    assert spec.data_config["input_size"] == [3, HEIGHT, WIDTH] and spec.data_config["crop_mode"] == "squash"
    assert all(m.num_classes == 8 for m in trainer.population.members)
    evaluations = [e for e in trainer.state.log_history if "eval_mAP" in e]
    assert [e["epoch"] for e in evaluations] == [1.0, 2.0]  # eval_strategy epoch, through the Trainer's loop
    for entry in evaluations:
        for k in (0, 1):
            for name in ("mAP", "rank1", "rank5", "rank10"):
                assert 0.0 <= entry[f"eval_member{k}_{name}"] <= 100.0
        assert entry["eval_member0_rank1"] <= entry["eval_member0_rank5"] <= entry["eval_member0_rank10"]
        assert 0.0 <= entry["eval_ensemble_mAP"] <= 100.0
        assert (entry["eval_valid_queries"], entry["eval_skipped_queries"]) == (6, 1)
        k = int(entry["eval_selected_member"])  # best by mAP
        assert entry[f"eval_member{k}_mAP"] == max(entry["eval_member0_mAP"], entry["eval_member1_mAP"])
        assert (entry["eval_mAP"], entry["eval_rank1"]) == (entry[f"eval_member{k}_mAP"], entry[f"eval_member{k}_rank1"])
        assert entry["eval_loss"] == 0.0  # no cross-entropy on [identity, camera, is_query]
    # training itself is identity classification: every member's CE was logged and went down
    ce = [e["member0_ce"] for e in trainer.state.log_history if "member0_ce" in e]
    assert len(ce) == 6 and ce[-1] < ce[0]


def test_the_logged_metrics_equal_a_per_query_reference_on_the_members_features(reid_run):
    """The Trainer's evaluation loop (batches of 8, query then gallery) gives the numbers a direct
    computation gives: every member's features of every image, ranked one query at a time."""
    trainer, _ = reid_run
    dataset = trainer.eval_dataset
    batch = torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])
    labels = dataset.reid_labels.numpy()
    query = labels[:, 2] == 1
    final = trainer.results
    with torch.no_grad():
        for k, member in enumerate(trainer.population.members):
            member.eval()
            features = member.forward_head(member.forward_features(batch), pre_logits=True).numpy()
            expected = reference_metrics(features[query], features[~query], labels[query, 0], labels[~query, 0],
                                         labels[query, 1], labels[~query, 1])
            assert expected["valid_queries"] == 6
            assert final[f"eval_member{k}_mAP"] == pytest.approx(expected["mAP"], abs=1e-4)
            assert final[f"eval_member{k}_rank1"] == pytest.approx(expected["rank1"], abs=1e-4)


def test_results_select_by_map_and_say_the_task(reid_run):
    trainer, _ = reid_run
    results = json.loads((Path(trainer.args.output_dir) / "all_results.json").read_text())
    assert results["task"] == "reid" and results["selected_member"] == int(results["eval_selected_member"])
    assert "highest eval mAP" in results["selection_reason"] and "query and gallery" in results["selection_reason"]
    assert results["eval_members_mean_mAP"] == pytest.approx(
        (results["eval_member0_mAP"] + results["eval_member1_mAP"]) / 2)


def test_the_exported_student_evaluates_to_the_runs_numbers(reid_run, market, tmp_path):
    """`hf-graft evaluate --task reid` on the student folder gives the run's final numbers again, from the
    timm model and its transform as exported (256 x 128 style non-square input, whole-image resize)."""
    from hf_graft.cli.evaluate import main

    trainer, _ = reid_run
    results = trainer.results
    student = Path(results["student_dir"])
    config = json.loads((student / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [3, HEIGHT, WIDTH]
    assert config["pretrained_cfg"]["crop_mode"] == "squash" and config["label_names"] == [str(i) for i in TRAIN_IDS]
    out = tmp_path / "eval.json"
    assert main([str(student), "--task", "reid", "--dataset_name", "market1501", "--data_dir", str(market),
                 "--batch_size", "5", "--num_workers", "0", "--no_progress", "--json", str(out)]) == 0
    evaluated = json.loads(out.read_text())
    assert (evaluated["num_query"], evaluated["num_gallery"]) == (7, 21)  # junk dropped, distractors kept
    assert (evaluated["valid_queries"], evaluated["skipped_queries"]) == (6, 1)
    for name in ("mAP", "rank1", "rank5", "rank10"):
        assert evaluated[name] == pytest.approx(results[f"eval_{name}"], abs=1e-4)


def test_the_card_is_a_reid_card_and_transformers_gives_the_same_features(reid_run):
    from huggingface_hub import ModelCard
    from transformers import AutoModel

    import timm

    trainer, _ = reid_run
    results = trainer.results
    student = Path(results["student_dir"])
    card = ModelCard.load(student / "README.md")
    assert card.data.pipeline_tag == "image-feature-extraction" and "person-reid" in card.data.tags
    assert card.data.datasets is None  # a folder layout's name is not a Hub dataset
    shown = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert shown == {"mAP": pytest.approx(results["eval_mAP"]), "rank-1": pytest.approx(results["eval_rank1"])}
    assert "re-identification embedding model" in card.text and "pre_logits=True" in card.text
    assert "pooler_output" in card.text
    # what the card says: the timm features and transformers' pooled output are the same
    x = torch.randn(3, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(0))
    model = timm.create_model(f"local-dir:{student}", pretrained=True).eval()
    wrapped = AutoModel.from_pretrained(str(student)).eval()
    with torch.no_grad():
        timm_features = model.forward_head(model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(wrapped(pixel_values=x).pooler_output, timm_features)


def test_evaluate_refuses_classification_options_with_task_reid(market, capsys, reid_run):
    from hf_graft.cli.evaluate import main

    student = reid_run[0].results["student_dir"]
    args = [student, "--task", "reid", "--dataset_name", "market1501", "--data_dir", str(market)]
    assert main([*args, "--split", "test"]) == 2
    assert "--split: not with --task reid" in capsys.readouterr().err
    assert main([student, "--dataset_name", "builtin:digits", "--identity_column", "pid"]) == 2
    assert "--identity_column: with --task reid only" in capsys.readouterr().err
    assert main([student, "--task", "reid", "--dataset_name", "market1501", "--data_dir", str(market / "no")]) == 1
    assert capsys.readouterr().err.strip().endswith(f"DataArguments.data_dir: {str(market / 'no')!r} is not a folder")


# ----------------------------------------------------------------------------- the pieces
def test_population_features_loop_and_fused_agree_and_training_still_returns_logits():
    from hf_graft.population.students import PopulationSpec, StudentPopulation

    spec = PopulationSpec(student_model="cifar_resnet20", num_students=3, num_classes=5, task="reid")
    population = StudentPopulation.from_spec(spec, seed=0)
    population.set_output("features")
    x = torch.randn(4, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(1))
    population.eval()
    with torch.no_grad():
        loop = population(pixel_values=x)["logits"]
        population.set_execution(fused=True, model_name="cifar_resnet20")
        fused = population(pixel_values=x)["logits"]
        member = population.members[1]
        direct = member.forward_head(member.forward_features(x), pre_logits=True)
    assert loop.shape == (4, 3, 64) and set(population(pixel_values=x)) == {"logits"}
    torch.testing.assert_close(loop[:, 1], direct)
    torch.testing.assert_close(fused, loop, rtol=1e-4, atol=1e-5)
    population.train()
    out = population(pixel_values=x, labels=torch.tensor([0, 1, 2, 3]))
    assert out["logits"].shape == (4, 3, 5) and out["member_ce"].shape == (3,)
    with pytest.raises(ValueError, match="allowed: logits, features"):
        population.set_output("embeddings")


def test_reid_metrics_per_member_ensemble_selection_and_a_diverged_member():
    from hf_graft.metrics import ReidMetrics
    from hf_graft.metrics.reid import ensemble_features, reid_metrics

    generator = torch.Generator().manual_seed(0)
    n_query, n_gallery = 6, 18
    identities = torch.cat([torch.arange(6), torch.arange(6).repeat(3)])
    cameras = torch.cat([torch.zeros(6, dtype=torch.long), torch.arange(18) // 6])
    is_query = torch.cat([torch.ones(n_query), torch.zeros(n_gallery)]).long()
    centres = torch.randn(6, 8, generator=generator)
    features = torch.stack([centres[identities] + s * torch.randn(24, 8, generator=generator) for s in (0.3, 1.5)], 1)
    labels = torch.stack([identities, cameras, is_query], 1)
    results = ReidMetrics("best")(features.numpy(), labels.numpy())
    q, g = is_query.bool(), ~is_query.bool()
    for k in (0, 1):
        expected = reid_metrics(features[q, k], features[g, k], identities[q], identities[g], cameras[q], cameras[g])
        assert results[f"member{k}_mAP"] == pytest.approx(expected["mAP"])
        assert results[f"member{k}_rank10"] == pytest.approx(expected["rank10"])
    ensemble = ensemble_features([features[:, 0], features[:, 1]])
    expected = reid_metrics(ensemble[q], ensemble[g], identities[q], identities[g], cameras[q], cameras[g])
    assert results["ensemble_mAP"] == pytest.approx(expected["mAP"])
    assert (results["valid_queries"], results["skipped_queries"]) == (6.0, 0.0)
    best = int(results["selected_member"])
    assert results[f"member{best}_mAP"] == max(results["member0_mAP"], results["member1_mAP"])
    assert results["mAP"] == results[f"member{best}_mAP"]
    explicit = ReidMetrics("1")(features, labels)
    assert explicit["selected_member"] == 1.0 and explicit["mAP"] == results["member1_mAP"]
    # a diverged member: NaN numbers, out of the ensemble and of best
    broken = features.clone()
    broken[3, 0, 0] = float("nan")
    diverged = ReidMetrics("best")(broken, labels)
    assert math.isnan(diverged["member0_mAP"]) and diverged["selected_member"] == 1.0
    alone = reid_metrics(*(ensemble_features([features[:, 1]])[m] for m in (q, g)), identities[q], identities[g],
                         cameras[q], cameras[g])
    assert diverged["ensemble_mAP"] == pytest.approx(alone["mAP"])
    with pytest.raises(ValueError, match=r"\[N, K, D\] features and \[N, 3\] labels"):
        ReidMetrics()(features, labels[:, :2])


@pytest.mark.parametrize("kwargs, message", [
    (dict(task="detection"), "DataArguments.task: got 'detection'; allowed: classification, reid"),
    (dict(task="reid", eval_split="test"), "DataArguments.eval_split: got 'test' with task reid"),
    (dict(task="reid", label_column="pid"), "DataArguments.label_column: got 'pid' with task reid"),
    (dict(task="reid", max_eval_samples=10), "DataArguments.max_eval_samples: got 10 with task reid"),
    (dict(task="reid", selection_split_percentage=5.0), "DataArguments.selection_split_percentage: got 5.0"),
    (dict(task="reid", data_on_device=True), "DataArguments.data_on_device: got true with task reid"),
    (dict(identity_column="pid"), "DataArguments.identity_column: got 'pid' with task classification"),
    (dict(input_height=256), "DataArguments.input_width: required with input_height"),
    (dict(input_size=32, input_height=32, input_width=16), "DataArguments.input_size: got 32 with input_height 32"),
    (dict(input_height=0, input_width=16), "DataArguments.input_height: got 0; allowed: a positive integer"),
    (dict(random_erasing=1.5), "DataArguments.random_erasing: got 1.5; allowed: a probability in [0, 1]"),
    (dict(random_erasing=0.5, normalize_on_device=True), "DataArguments.random_erasing: got 0.5 with normalize_on_device"),
])
def test_data_arguments_refuse_what_a_task_does_not_use(kwargs, message):
    with pytest.raises(ConfigError) as err:
        DataArguments(**kwargs)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_loader_errors_name_the_data_arguments_field(market, tmp_path):
    from hf_graft.training.builder import load_data

    config = GraftingConfig(output_dir=str(tmp_path / "o"), use_cpu=True)
    with pytest.raises(ValueError, match=r"^DataArguments.data_dir: the market1501 layout needs the folder"):
        load_data(config, DataArguments(task="reid", dataset_name="market1501"))
    from datasets import DatasetDict

    from hf_graft.data.reid import load_reid_folder

    folder = load_reid_folder("market1501", market)
    saved = tmp_path / "saved"  # a DatasetDict without a gallery split
    DatasetDict({"train": folder.train.remove_columns("label"), "query": folder.query}).save_to_disk(str(saved))
    with pytest.raises(ValueError, match=r"^DataArguments.gallery_split: 'gallery' is not one of the dataset's splits"):
        load_data(config, DataArguments(task="reid", dataset_name=str(saved)))
    data = load_data(config, DataArguments(task="reid", dataset_name="market1501", data_dir=str(market),
                                           max_train_samples=10))
    assert len(data.train) == 10 and data.num_identities == 8  # the classifier keeps every identity


def test_non_square_transforms_pad_crop_random_erasing_and_whole_image_evaluation():
    from hf_graft.data.transforms import build_transform, resolve_student_data_config
    from hf_graft.population.students import create_member

    model = create_member("cifar_resnet20", num_classes=4, seed=0)
    config = resolve_student_data_config(model, (HEIGHT, WIDTH), whole_image=True)
    assert config["input_size"] == [3, HEIGHT, WIDTH] and (config["crop_pct"], config["crop_mode"]) == (1.0, "squash")
    # a box of another shape (20 x 20) is squashed whole into 32 x 16: its top half (red) stays the top half
    image = np.zeros((20, 20, 3), dtype=np.uint8)
    image[:10, :, 0] = 255
    image[10:, :, 2] = 255
    evaluation = build_transform(config, DataArguments(), is_training=False)(PILImage.fromarray(image))
    red = evaluation[0] > evaluation[2]
    assert evaluation.shape == (3, HEIGHT, WIDTH) and red[: HEIGHT // 2 - 1].all() and not red[HEIGHT // 2 + 1:].any()
    args = DataArguments(input_height=HEIGHT, input_width=WIDTH, train_augmentation="pad_crop", crop_padding=4,
                         random_erasing=1.0)
    torch.manual_seed(0)
    erased = build_transform(config, args, is_training=True)(PILImage.fromarray(image))
    plain = build_transform(config, DataArguments(input_height=HEIGHT, input_width=WIDTH, train_augmentation="pad_crop",
                                                  crop_padding=4), is_training=True)
    assert erased.shape == plain(PILImage.fromarray(image)).shape == (3, HEIGHT, WIDTH)
    # random erasing (probability 1): a rectangle set to 0 in every channel, which the plain image never has
    zero = (erased == 0).all(0)
    assert zero.sum() >= 0.02 * HEIGHT * WIDTH


RECIPES = sorted(p for p in (ROOT / "recipes").glob("*.yaml") if p.stem.startswith(("market1501_", "dukemtmc_reid_")))


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_table7_recipes_build_their_population_and_datasets_offline(recipe, market, tmp_path, monkeypatch):
    """Each recipe, its data_dir pointed at the tiny folder (written in the Market layout under the
    recipe's layout name), its ImageNet weights off (not available offline) and its networks built on the
    meta device: the population and both datasets the run would train and evaluate on."""
    import timm

    from hf_graft.cli.recipe import parse_recipe
    from hf_graft.training.builder import build_run

    data_dir = market
    if "dukemtmc_reid" in recipe.stem:  # the same images, named as DukeMTMC-reID names them
        data_dir = tmp_path / "duke"
        for image in market.rglob("*.png"):
            identity, camera, frame = image.stem.split("_")[0], image.stem.split("_")[1][1], image.stem.split("_")[2]
            (data_dir / image.parent.name).mkdir(parents=True, exist_ok=True)
            (data_dir / image.parent.name / f"{identity}_c{camera}_f{frame}.png").write_bytes(image.read_bytes())
    data_args, config = parse_recipe(recipe, ["--data_dir", str(data_dir), "--student_pretrained", "false",
                                              "--output_dir", str(tmp_path / "out"), "--use_cpu", "true"])
    assert data_args.task == "reid" and config.student_model in ("resnet50", "mobilenetv2_100")
    assert (config.per_device_train_batch_size, config.num_train_epochs, config.learning_rate) == (32, 60, 0.1)
    assert config.lr_decay_epochs == [20, 40] and config.weight_decay_scope == "all" and config.select_student == "0"
    monkeypatch.setattr(timm, "create_model", functools.partial(timm.create_model, device="meta"))
    parts = build_run(config, data_args)
    population = parts.population
    assert population.num_members == config.num_students and population.task == "reid"
    assert all(m.get_classifier().out_features == 8 for m in population.members)
    assert population.spec.data_config["input_size"] == [3, 256, 128]
    item = parts.train_dataset[0]
    members = config.num_students
    assert item["pixel_values"].shape == ((members, 3, 256, 128) if members > 1 else (3, 256, 128))
    assert item["labels"].shape == ((members,) if members > 1 else ())
    assert len(parts.train_dataset) == 48 and len(parts.eval_dataset) == 28
    example = parts.eval_dataset[len(parts.eval_dataset) - 1]
    assert example["pixel_values"].shape == (3, 256, 128) and example["labels"].tolist()[2] == 0


def test_a_checkpoint_member_exports_with_its_logged_reid_numbers(reid_run, tmp_path):
    """`hf-graft export` of a re-identification checkpoint: the card of member 1 carries member 1's mAP and
    rank-1 as logged at that checkpoint's step."""
    from huggingface_hub import ModelCard

    from hf_graft.cli.export import main

    trainer, _ = reid_run
    checkpoint = Path(trainer.args.output_dir) / "checkpoint-6"
    assert main([str(checkpoint), "--member", "1", "--out", str(tmp_path / "m1")]) == 0
    logged = next(e for e in trainer.state.log_history if e.get("step") == 6 and "eval_mAP" in e)
    card = ModelCard.load(tmp_path / "m1" / "README.md")
    shown = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert shown == {"mAP": pytest.approx(logged["eval_member1_mAP"]), "rank-1": pytest.approx(logged["eval_member1_rank1"])}
    assert "re-identification embedding model" in card.text


def test_a_resumed_reid_run_ends_with_the_same_numbers(reid_run, tmp_path):
    """Resuming from the first epoch's checkpoint (its own folder, a copy) trains the second epoch as the
    uninterrupted run did: the same final evaluation."""
    import shutil

    from hf_graft.training.builder import build_run
    from hf_graft.training.trainer import GraftingTrainer

    trainer, data_args = reid_run
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(Path(trainer.args.output_dir) / "checkpoint-3", out / "checkpoint-3")
    config = GraftingConfig(**{**{f: getattr(trainer.args, f) for f in ("student_model", "num_students",
                                  "num_train_epochs", "per_device_train_batch_size", "per_device_eval_batch_size",
                                  "learning_rate", "lr_spread", "dataloader_num_workers", "logging_steps", "seed")},
                               "output_dir": str(out), "use_cpu": True, "save_strategy": "no", "report_to": "none",
                               "resume_from_checkpoint": str(out / "checkpoint-3"), "export_student": False})
    resumed = GraftingTrainer(args=config, **build_run(config, data_args).trainer_kwargs())
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        resumed.train(resume_from_checkpoint=str(out / "checkpoint-3"))
    finally:
        torch.set_num_threads(previous)
    for name in ("eval_member0_mAP", "eval_member1_mAP", "eval_ensemble_mAP", "eval_rank1"):
        assert resumed.results[name] == pytest.approx(trainer.results[name], abs=1e-4)


def test_extra_metrics_are_refused_for_a_reid_population(tmp_path):
    """Extra `evaluate` metrics take class predictions, which a features evaluation has none of."""
    from hf_graft.population.students import PopulationSpec
    from hf_graft.training.trainer import GraftingTrainer

    spec = PopulationSpec(student_model="cifar_resnet20", num_students=2, num_classes=4, task="reid")
    config = GraftingConfig(output_dir=str(tmp_path / "o"), use_cpu=True, extra_metrics=["f1"])
    with pytest.raises(ValueError, match=r"^GraftingConfig.extra_metrics: got \['f1'\] with a re-identification"):
        GraftingTrainer(model=spec, args=config)
