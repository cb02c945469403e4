import os
from unittest import mock

import pytest

# Never reach for the network in tests: hub clients fail fast instead of retrying for ~46 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def inception_file(tmp_path_factory):
    """torch-fidelity's InceptionV3 with Kaiming-normal random weights (~96 MB, made at test time, never committed):
    features that vary with the image, so FID, IS, precision and recall can be checked offline."""
    import torch
    from torch import nn
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    torch.manual_seed(0)
    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
    path = tmp_path_factory.mktemp("inception") / "inception_random.pth"
    torch.save(net.state_dict(), path)
    return path
