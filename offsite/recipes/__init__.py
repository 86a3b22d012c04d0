"""One recipe per user command: a frozen spec in, the command's whole sequence run, a result out.

The CLIs (`owner/`, `data_owner/`) parse flags into these specs and call one function each; library
users call the same functions (`offsite.package`, ... in `offsite/__init__.py`). Progress is
reported through optional callbacks; nothing here prints. Modules are imported on use (the
exchange's need grpc).
"""
