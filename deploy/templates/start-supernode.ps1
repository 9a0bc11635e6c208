# Start this site's flowerbed SuperNode from the kit folder (Windows PowerShell).
# Before the first start: set data_path in site.toml, and activate the environment that has
# flowerbed installed (conda activate flowerbed-supernode-cpu), or set $env:FLOWERBED to its path.
$ErrorActionPreference = "Stop"
Set-Location -Path $PSScriptRoot
$flowerbed = if ($env:FLOWERBED) { $env:FLOWERBED } else { "flowerbed" }
& $flowerbed supernode start --kit . @args
exit $LASTEXITCODE
