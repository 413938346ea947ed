"""`ministral-serve bench`: our service against vLLM's own server, same machine, same run.

stacks.py starts and stops the two servers, workloads.py defines what
they are sent, runner.py sweeps concurrencies with vLLM's load generator,
report.py turns the runs into ratios, headline figures and plots.
"""
