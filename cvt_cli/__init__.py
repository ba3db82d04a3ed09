"""The `cvt` command line: one parser, one mapping from errors to exit codes, one module per command
(convert, verify, export, demo, train, predict, attention). It only parses, calls the libraries (`conversion`,
`cvt_torch`, `cvt_tf`, `cvt_core`) and reports; nothing imports it back.

    cvt convert SRC DST ...     python -m cvt_cli convert SRC DST ...
"""
