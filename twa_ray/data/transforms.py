"""Per-dataset normalisation constants and the train / eval transforms.

In-memory datasets (Fashion-MNIST, CIFAR) transform (C, H, W) float tensors in [0, 1];
ImageFolder transforms PIL images.
"""

from __future__ import annotations

from torchvision import transforms as T

# Per-channel mean / std of the official training sets (pixel values in [0, 1]).
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def tensor_transforms(mean, std, image_size: int, crop_padding: int, augment: bool):
    """(train, eval) transforms for (C, H, W) float tensors in [0, 1].

    With ``augment`` the train transform is the standard CIFAR recipe: pad by
    ``crop_padding`` with zeros, random crop back to ``image_size``, random horizontal flip.
    Both end with normalisation by ``mean`` / ``std``.
    """
    normalize = T.Normalize(mean, std)
    eval_transform = normalize
    if not augment:
        return eval_transform, eval_transform
    train_transform = T.Compose([
        T.RandomCrop(image_size, padding=crop_padding),
        T.RandomHorizontalFlip(),
        normalize,
    ])
    return train_transform, eval_transform


def imagefolder_transforms(image_size: int, augment: bool):
    """(train, eval) transforms for PIL images, ImageNet style, output (3, image_size, image_size)."""
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    eval_transform = T.Compose([
        T.Resize(round(image_size * 256 / 224)),
        T.CenterCrop(image_size),
        T.ToTensor(),
        normalize,
    ])
    if not augment:
        return eval_transform, eval_transform
    train_transform = T.Compose([
        T.RandomResizedCrop(image_size),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        normalize,
    ])
    return train_transform, eval_transform
