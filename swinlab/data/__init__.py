"""LightningDataModules, one per dataset family."""

__all__: list[str] = []

from swinlab.data.coco import COCODataModule

__all__ += ["COCODataModule"]

from swinlab.data.classification import ImageFolderDataModule  # noqa: E402
from swinlab.data.fashion_mnist import FashionMNISTDataModule  # noqa: E402
from swinlab.data.imagenet import ImageNetDataModule  # noqa: E402

__all__ += ["FashionMNISTDataModule", "ImageFolderDataModule", "ImageNetDataModule"]

from swinlab.data.ade20k import ADE20KDataModule  # noqa: E402
from swinlab.data.segmentation import SegmentationDataModule  # noqa: E402

__all__ += ["ADE20KDataModule", "SegmentationDataModule"]

from swinlab.data.unlabeled import UnlabeledImageDataModule  # noqa: E402

__all__ += ["UnlabeledImageDataModule"]
