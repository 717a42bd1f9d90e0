"""The ARRA-vs-baseline study (launch/study.py): data, instruments, runs, evaluation, report."""
