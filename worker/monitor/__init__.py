"""Monitoring: how each model does on this site's patients against the final reports, over time.

- :mod:`worker.monitor.stats`: sensitivity, specificity, PPV, NPV (Wilson) and AUC (DeLong) with 95% intervals
- :mod:`worker.monitor.concordance`: study-level pairs per bundle version, finding and window; alarms
- :mod:`worker.monitor.plots`: the figures over time as PNG
- :mod:`worker.cli.monitor`: ``pleura monitor``
"""
