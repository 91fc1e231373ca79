"""Numbers quoted in docstrings and docs equal the code's (issue 13 item 3: the ReLU gain was
quoted as 1.7139; the code's value is 1.7129)."""
import math
import os
import re

import d2_norms  # noqa: F401
from d2_norms.layers import RELU_GAIN, activation_gain

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_relu_gain_quoted_in_docstring_and_backbones_doc():
    # NF sec. 4.3: gamma = 1 / sqrt(Var(relu(x))), x ~ N(0, 1), Var = (1/2)(1 - 1/pi).
    exact = 1.0 / math.sqrt(0.5 * (1.0 - 1.0 / math.pi))
    assert abs(RELU_GAIN - exact) < 1e-12 and abs(activation_gain("relu") - exact) < 1e-12
    quoted_doc = re.search(r"sqrt\(2 / \(1 - 1/pi\)\)``\s*\(about (\d\.\d+)\)",
                           activation_gain.__doc__)
    assert quoted_doc, "activation_gain's docstring no longer quotes the ReLU gain"
    with open(os.path.join(REPO, "docs", "backbones.md")) as f:
        quoted_md = re.findall(r"sqrt\(2/\(1-1/pi\)\)` = (\d\.\d+)", f.read())
    assert quoted_md
    for value in [quoted_doc.group(1), *quoted_md]:
        assert round(exact, len(value) - 2) == float(value), value
