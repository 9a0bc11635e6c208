# Start this site's flowerbed SuperNode from the kit folder (Windows PowerShell).
# It uses, in this order: $env:FLOWERBED, the kit's own .venv (the offline install), or `flowerbed`
# on PATH (conda activate flowerbed-supernode-cpu). Set data_path in site.toml before the first start.
$ErrorActionPreference = "Stop"
Set-Location -Path $PSScriptRoot
$flowerbed = if ($env:FLOWERBED) { $env:FLOWERBED } elseif (Test-Path ".venv\Scripts\flowerbed.exe") { ".venv\Scripts\flowerbed.exe" } else { "flowerbed" }
& $flowerbed supernode start --kit . @args
exit $LASTEXITCODE
