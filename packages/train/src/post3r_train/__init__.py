"""post3r_train: POST3R model composition, run configuration, training engine and entry points.

```python
from post3r_train import POST3RModel, load_config

cfg = load_config("smoke", ["model.num_slots=5"])
model = POST3RModel.from_config(cfg)
```
"""

from post3r_train.config import RunConfig, load_config
from post3r_train.errors import ConfigError, TrainError
from post3r_train.model import POST3RModel

__all__ = ["ConfigError", "POST3RModel", "RunConfig", "TrainError", "load_config"]
