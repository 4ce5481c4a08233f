"""End-to-end jobs composed of the library layers below: the ``actsparse finetune`` job and
the AP digits experiment (``ap_digits``)."""
