"""The storage contract that the client and the worker share. Internal: not a user API.

Everything a process needs to put records where readers find them, and nothing else:

- the **stream entry** (`StreamKeys` names the Redis keys; `ENTRY_FIELDS` and the `FIELD_*`
  constants are an entry's fields): the encoded records travel with their partition keys
  beside them, so the worker routes bytes without parsing them;
- the **bundle**: `n` records of one (date, host) in one entry, at most `BUNDLE_RECORDS` records
  or `BUNDLE_BYTES` bytes, `bundle_sum` telling this client's bundles from anyone else's;
- the **record entry** (`RecordEntry`): one encoded record and its partition keys;
- the **partition layout** (`log_dir/date=YYYY-MM-DD/host=NAME/`): `partition_dir`, the date rule
  (`is_valid_date`), the host rules (`host_problem`, `check_host`, `sanitize_partition_value`,
  `MAX_HOST_LEN`) and the modes of the tree's files and directories (`FileModes`, `LOG_MODES`,
  `log_modes`, `make_dirs`, `parse_mode`);
- undoing an unfinished batch (`cut_back`), for the writer process and the worker alike;
- the **partition writer** (`PartitionWriter`: `PartitionLines` in, a `BatchPlan` of files and
  offsets decided before writing, a `WriteResult` out), which the embedded client's writer
  and the worker both use.

The worker imports these names from here only, so the client may rearrange its private modules
freely; changing what they mean changes the contract (and `vllm_middleware.SCHEMA_VERSION`).
This module is named without an underscore because another package depends on it, yet it
makes no promise to users: applications use the names in `vllm_middleware.__all__`.
"""

from ._keys import (
    BUNDLE_BYTES,
    BUNDLE_RECORDS,
    ENTRY_FIELDS,
    FIELD_COUNT,
    FIELD_DATE,
    FIELD_ERROR,
    FIELD_HOST,
    FIELD_RECORD,
    FIELD_SUM,
    StreamKeys,
    bundle_sum,
)
from ._modes import LOG_MODES, FileModes, log_modes, make_dirs, parse_mode
from ._partition import (
    MAX_HOST_LEN,
    BatchPlan,
    PartitionLines,
    PartitionWriter,
    WriteResult,
    check_host,
    cut_back,
    host_problem,
    is_valid_date,
    partition_dir,
    sanitize_partition_value,
)
from ._record import RecordEntry

__all__ = [
    "BUNDLE_BYTES",
    "BUNDLE_RECORDS",
    "ENTRY_FIELDS",
    "FIELD_COUNT",
    "FIELD_DATE",
    "FIELD_ERROR",
    "FIELD_HOST",
    "FIELD_RECORD",
    "FIELD_SUM",
    "LOG_MODES",
    "MAX_HOST_LEN",
    "BatchPlan",
    "FileModes",
    "PartitionLines",
    "PartitionWriter",
    "RecordEntry",
    "StreamKeys",
    "WriteResult",
    "bundle_sum",
    "check_host",
    "cut_back",
    "host_problem",
    "is_valid_date",
    "log_modes",
    "make_dirs",
    "parse_mode",
    "partition_dir",
    "sanitize_partition_value",
]
