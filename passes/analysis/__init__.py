"""Built-in analysis passes; importing this package registers them."""

from winnow.passes.analysis import das_skip  # noqa: F401
from winnow.passes.analysis import layer_similarity  # noqa: F401
from winnow.passes.analysis import head_entropy  # noqa: F401
from winnow.passes.analysis import head_importance  # noqa: F401
from winnow.passes.analysis import quant_sensitivity  # noqa: F401
from winnow.passes.analysis import channel_importance  # noqa: F401
