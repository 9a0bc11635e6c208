"""The marker that a site's ClientApp puts before each line meant for the site's own console."""

TASK_EVENT = "flowerbed-task:"
