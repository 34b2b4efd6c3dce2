"""The workbench around the package: the notebook pipeline and the results it prints.

    pipeline  runs the numbered notebooks with papermill (``hrseg run``)
    pool      runs independent notebooks side by side, each in its own process group
    results   collects evaluated runs into the paper-style Dice table (``hrseg table``)
    lesion_table  lesions found and their Dice by size, per resolution (``hrseg table --lesions``)
    verdict   the one sentence computed from that table, read against Hou et al.'s Table 1
    notebook_save  the Jupyter pre-save hook: a JupyterLab save keeps only what the user changed
    interrupt SIGINT / SIGTERM: unwind the command, stop its children and their kernels
"""
