/* Header-only target: see include/kvstore_abi.h. */
