"""CIFAR-10 loading, the protocol's splits, and reproducible augmented batches."""

import pytest
import torch

from train_ghn.data import ImageBatches, balanced_test_indices, load_cifar10


def test_balanced_indices_take_first_per_class_in_file_order():
    labels = torch.tensor([0, 0, 1, 2, 1, 0, 2, 2, 1])
    assert balanced_test_indices(labels, per_class=2).tolist() == [0, 1, 2, 3, 4, 6]


def test_batches_resume_from_state_and_augment_by_shifting():
    images = torch.arange(20 * 3 * 32 * 32, dtype=torch.int64).remainder(251).to(torch.uint8).view(20, 3, 32, 32)
    labels = torch.arange(20) % 10
    a = ImageBatches(images, labels, batch_size=8, seed=1)
    a.next()
    state = a.state_dict()
    expected = [a.next() for _ in range(4)]
    b = ImageBatches(images, labels, batch_size=8, seed=99)
    b.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(expected, (b.next() for _ in range(4))):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    plain = ImageBatches(images, labels, batch_size=8, seed=1, augment=False).next()[0]
    assert plain.shape == expected[0][0].shape == (8, 3, 32, 32)


def test_missing_data_error_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="GHN_INIT_DATA"):
        load_cifar10("train", root=tmp_path)


@pytest.mark.data
def test_splits_and_balanced_test_set():
    val_x, val_y = load_cifar10("val", indices=torch.arange(10).numpy())
    assert val_x.shape == (10, 3, 32, 32) and val_x.dtype == torch.uint8
    _, test_y = load_cifar10("test", indices=torch.arange(0).numpy())
    assert len(test_y) == 0
    import numpy as np

    from train_ghn.data import _NPZ, data_root

    with np.load(data_root() / _NPZ) as files:
        labels = torch.from_numpy(files["y_test"].astype(np.int64))
    keep = balanced_test_indices(labels)
    assert len(keep) == 2000 and torch.bincount(labels[keep]).tolist() == [200] * 10
    assert torch.bincount(labels[:2000], minlength=10).max() > 500, "the first 2,000 are not balanced"
